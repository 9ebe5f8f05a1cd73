//! Choosing the device the forward pass runs on: `cpu` or `cuda[:N]`, checked against what
//! this build supports. Metal is not offered: candle's Metal back-end compiles on Apple
//! platforms only, so it could be neither built nor tested with this project's machines.

use candle_core::Device;

use super::error::{LmError, LmResult};

/// The device kinds this build can run on (`cpu` always; `cuda` with the `cuda` feature).
/// Whether such a device is present is only known when [`parse_device`] opens it.
pub fn supported_devices() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if candle_core::utils::cuda_is_available() {
        v.push("cuda");
    }
    v
}

/// Open a device from its name: `cpu`, `cuda`, `cuda:N` (ordinal `N`, default 0).
///
/// # Errors
/// [`LmError::DeviceUnavailable`] for an unknown name, a kind this build was compiled
/// without (the message names the cargo feature), `metal` (not offered), or a device that
/// cannot be opened.
pub fn parse_device(name: &str) -> LmResult<Device> {
    let unavailable = |reason: String| LmError::DeviceUnavailable {
        device: name.to_string(),
        reason,
    };
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| unavailable(format!("`{n}` is not a device number")))?,
        ),
        None => (name, 0),
    };
    match kind {
        "cpu" if ordinal == 0 => Ok(Device::Cpu),
        "cpu" => Err(unavailable("there is one CPU device, `cpu`".into())),
        "cuda" if !candle_core::utils::cuda_is_available() => Err(unavailable(
            "this build has no CUDA support (rebuild with `--features cuda`, see docs/gpu.md)"
                .into(),
        )),
        "metal" => Err(unavailable(
            "Metal is not supported (candle's Metal back-end builds on Apple platforms only \
             and was not built or tested for this crate; see docs/gpu.md)"
                .into(),
        )),
        "cuda" => Device::new_cuda(ordinal).map_err(|e| unavailable(e.to_string())),
        _ => Err(unavailable(format!(
            "unknown device kind `{kind}` (expected cpu or cuda[:N]; this build supports {})",
            supported_devices().join(", ")
        ))),
    }
}

/// A short name of a device (`cpu`, `cuda:0`, `metal:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_kinds_are_errors() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&Device::Cpu), "cpu");
        for bad in ["gpu", "cpu:1", "cuda:x", "", "metal", "metal:0"] {
            let e = parse_device(bad).unwrap_err();
            assert!(matches!(e, LmError::DeviceUnavailable { .. }), "{bad}: {e}");
        }
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(supported_devices()[0], "cpu");
    }
}
