//! Comparing model outputs (feature `lm`): the largest difference between two tensors, as
//! the model tests use it.

use candle_core::{Tensor, D};

use crate::lm::LmResult;

/// Largest absolute difference between two equally shaped tensors.
///
/// # Errors
/// [`crate::lm::LmError::Candle`] on shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> LmResult<f32> {
    Ok((a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?)
}
