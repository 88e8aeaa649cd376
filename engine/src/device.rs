//! Where the trainer and server compute, and in which dtype: CUDA when the binary was built
//! with the `cuda` feature and a GPU is there, the CPU otherwise (or as the user says).

use std::str::FromStr;

use candle_core::{DType, Device};

/// `auto`, `cpu`, `cuda` or `cuda:<ordinal>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: expected auto, cpu, cuda or cuda:<ordinal>")]
    Parse(String),
    #[error("GPU {ordinal}: {source}")]
    Open {
        ordinal: usize,
        source: candle_core::Error,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.to_owned())),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. `auto` takes GPU 0 when this build has CUDA and GPU 0 opens, the CPU
    /// otherwise; asking for `cuda` where it cannot open (no GPU, or a build without CUDA) is
    /// an error that says why.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cuda(ordinal) => {
                Device::new_cuda(ordinal).map_err(|source| DeviceError::Open { ordinal, source })
            }
            // `cuda_is_available` says only whether this build has CUDA.
            Self::Auto if candle_core::utils::cuda_is_available() => {
                Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
            }
            Self::Auto | Self::Cpu => Ok(Device::Cpu),
        }
    }
}

/// The dtype activations and frozen weights take on `device`: bf16 on a GPU (as PEFT's QLoRA
/// recipe computes), f32 on the CPU, where bf16 arithmetic is emulated and slower. Trainable
/// LoRA weights and optimizer state stay f32 everywhere.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "auto".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Auto)
        );
        assert_eq!(
            "cuda:1".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(1))
        );
        assert_eq!(
            "cuda".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(0))
        );
        let error = "gpu".parse::<DeviceChoice>().expect_err("not a device");
        assert!(error.to_string().contains("cuda:<ordinal>"), "{error}");
    }

    #[test]
    fn cpu_is_f32_and_auto_without_a_gpu_is_the_cpu() {
        assert!(DeviceChoice::Cpu.open().is_ok_and(|d| d.is_cpu()));
        assert_eq!(compute_dtype(&Device::Cpu), DType::F32);
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Auto.open().is_ok_and(|d| d.is_cpu()));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_for_cuda_without_it_is_an_error() {
        let error = DeviceChoice::Cuda(0)
            .open()
            .expect_err("no CUDA in this build");
        assert!(error.to_string().starts_with("GPU 0:"), "{error}");
    }
}

/// Bytes of memory `device` has free now: the GPU's free memory, or the system's available
/// memory (`MemAvailable`) for the CPU. `None` where it cannot be read.
pub fn free_memory(device: &Device) -> Option<usize> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free),
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            let system = kib.checked_mul(1024)?;
            // In a container the node's memory is not ours: the cgroup's limit is.
            Some(cgroup_headroom().map_or(system, |headroom| headroom.min(system)))
        }
        _ => None,
    }
}

/// What the process's cgroup (v2) may still use: its `memory.max` less `memory.current`;
/// `None` without a limit.
fn cgroup_headroom() -> Option<usize> {
    let read = |file: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{file}")).ok();
    let max: usize = read("memory.max")?.trim().parse().ok()?;
    let current: usize = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn the_cpus_free_memory_is_read() {
        let free = free_memory(&Device::Cpu).expect("/proc/meminfo on Linux");
        assert!(free > 1 << 20, "{free} bytes");
    }
}
