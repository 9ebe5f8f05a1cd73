//! The instruction sets the CPU kernels may use: detected at run time (users' CPUs differ, so
//! nothing is decided at compile time), and capped by the environment variable
//! [`KERNELS_ENV`] for comparisons and for CPUs where a wider set is slower.
//!
//! * `avx2`: AVX2 with FMA (the f32/bf16 tiles and the int8 dot products);
//! * `vnni`: 256-bit integer dot products (`vpdpbusd`, from AVX-VNNI or AVX-512 VNNI with
//!   VL): the int8 kernels with one instruction where AVX2 needs two;
//! * `avx512`: AVX-512 F, DQ, BW and VL: the f32/bf16 products on 512-bit registers, and
//!   with VNNI the two-by-four int8 kernels too.
//!
//! Every wider kernel computes the same sums in the same order as the AVX2 one (tested
//! bit-equal), so the choice changes speed, never results.

/// Caps the kernels' instruction sets: `portable` (no intrinsics), `avx2` (AVX2 and FMA
/// only), or `native` (everything detected; the default, also when unset or empty). Any
/// other value makes loading a model fail with [`LmError::InvalidConfig`] naming it.
pub const KERNELS_ENV: &str = "SMC_STEER_CPU_KERNELS";

use super::error::{LmError, LmResult};

/// `Ok` when [`KERNELS_ENV`] is unset or one of its values; the model loaders call it, so
/// that a mistyped value is an error rather than silently no cap.
///
/// # Errors
/// [`LmError::InvalidConfig`] naming the value and the accepted ones.
pub(crate) fn check_kernels_env() -> LmResult<()> {
    let cap = std::env::var(KERNELS_ENV).unwrap_or_default();
    match CpuFeatures::PORTABLE.capped(&cap) {
        Some(_) => Ok(()),
        None => Err(LmError::InvalidConfig(format!(
            "{KERNELS_ENV}=`{cap}` is not one of `native`, `avx2`, `portable`"
        ))),
    }
}

/// What the kernels may use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuFeatures {
    /// AVX2 and FMA.
    pub(crate) avx2: bool,
    /// 256-bit `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI with VL), with AVX2.
    pub(crate) vnni: bool,
    /// AVX-512 F, DQ, BW and VL, with AVX2.
    pub(crate) avx512: bool,
}

impl CpuFeatures {
    /// No intrinsics.
    const PORTABLE: CpuFeatures = CpuFeatures {
        avx2: false,
        vnni: false,
        avx512: false,
    };

    /// What this CPU has, uncapped (the tests run every kernel it can).
    pub(crate) fn detected() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            let avx512 =
                avx2 && has!("avx512f") && has!("avx512dq") && has!("avx512bw") && has!("avx512vl");
            let vnni = avx2 && (has!("avxvnni") || (has!("avx512vnni") && has!("avx512vl")));
            CpuFeatures { avx2, vnni, avx512 }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures::PORTABLE
    }

    /// What the kernels use: [`detected`](Self::detected), capped by [`KERNELS_ENV`]
    /// (read once; a value that is not one of the accepted ones, which the model loaders
    /// reject with [`check_kernels_env`], caps nothing here).
    pub(crate) fn in_use() -> CpuFeatures {
        static IN_USE: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
        *IN_USE.get_or_init(|| {
            let cap = std::env::var(KERNELS_ENV).unwrap_or_default();
            let all = Self::detected();
            all.capped(&cap).unwrap_or(all)
        })
    }

    /// These features, less what `cap` (a [`KERNELS_ENV`] value) excludes; `None` for a
    /// value that is not one of them.
    pub(crate) fn capped(self, cap: &str) -> Option<CpuFeatures> {
        match cap.trim() {
            "portable" => Some(CpuFeatures::PORTABLE),
            "avx2" => Some(CpuFeatures {
                vnni: false,
                avx512: false,
                ..self
            }),
            "native" | "" => Some(self),
            _ => None,
        }
    }

    /// Names of the instruction sets in use, for reports (`portable` when none).
    pub(crate) fn names(self) -> Vec<&'static str> {
        let all = [
            ("avx2", self.avx2),
            ("vnni", self.vnni),
            ("avx512", self.avx512),
        ];
        let v: Vec<&'static str> = all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        if v.is_empty() {
            vec!["portable"]
        } else {
            v
        }
    }
}

/// The instruction sets the CPU kernels use on this machine (`avx2`, `vnni`, `avx512`, or
/// `portable` for none), after [`KERNELS_ENV`]: for reports.
pub fn cpu_features() -> Vec<&'static str> {
    CpuFeatures::in_use().names()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap removes exactly what it names, whatever the CPU has; other values are
    /// refused.
    #[test]
    fn the_cap_removes_what_it_names() {
        let all = CpuFeatures {
            avx2: true,
            vnni: true,
            avx512: true,
        };
        assert_eq!(all.capped("portable"), Some(CpuFeatures::PORTABLE));
        assert_eq!(
            all.capped("avx2"),
            Some(CpuFeatures {
                avx2: true,
                vnni: false,
                avx512: false
            })
        );
        assert_eq!(all.capped("native"), Some(all));
        assert_eq!(all.capped(" "), Some(all));
        assert_eq!(all.capped("avx-2"), None);
        assert_eq!(
            CpuFeatures::PORTABLE.capped("avx2"),
            Some(CpuFeatures::PORTABLE)
        );
        assert_eq!(all.names(), ["avx2", "vnni", "avx512"]);
        assert_eq!(CpuFeatures::PORTABLE.names(), ["portable"]);
    }
}
