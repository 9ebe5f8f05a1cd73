//! Test aids, public so that users can check their own models the same way: an exact toy
//! kernel ([`ToyKernel`]), exact enumeration of the target ([`enumerate`]), and consistency
//! checks for potentials ([`assert_potential_consistent`]).

mod consistency;
mod exact;
mod toy;

pub use consistency::{assert_potential_consistent, assert_same_potential, assert_same_scores};
pub use exact::{enumerate, Exact, Outcome};
pub use toy::ToyKernel;

#[cfg(feature = "lm")]
mod tensors;
#[cfg(feature = "lm")]
pub use tensors::max_abs_diff;
