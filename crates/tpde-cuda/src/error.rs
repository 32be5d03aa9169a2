//! Errors of the GPU loader.
//!
//! The public error says who is at fault (no CUDA on this machine, the driver,
//! the caller's arguments, or the delta's bytes); each variant has a stable
//! code from [`GpuError::code`].

use std::fmt;

/// Bits of the device error flag that kernels raise instead of writing out of
/// range. They mirror the `ERR_*` constants in `kernels/tpde_apply.cu`.
pub mod flag {
    /// A position is `>= n` (the chunk's word count).
    pub const POSITION_RANGE: u32 = 1;
    /// A gap after the first one is 0 (positions must strictly increase).
    pub const ZERO_GAP: u32 = 2;
    /// A bitmap padding bit (past the chunk's last word) is set.
    pub const BITMAP_PADDING: u32 = 4;
    /// The words a chunk changes differ from its changed count (or the
    /// bitmap's set bits from the stored value count).
    pub const COUNT_MISMATCH: u32 = 8;
    /// A descriptor holds a kind, op, layout or order the kernels do not
    /// implement (a bug of this crate: records are checked before).
    pub const BAD_DESCRIPTOR: u32 = 16;
    /// A lane rANS stream's header, tables, context or tile lengths break
    /// spec §8.7 (`ERR_RANS_HEADER` of `kernels/tpde_rans.cu`).
    pub const RANS_HEADER: u32 = 32;
    /// A lane rANS tile has a state below 2^16, runs out of words, leaves
    /// words over or ends in a state other than 2^16 (§8.7).
    pub const RANS_DECODE: u32 = 64;

    /// `u32` words of the device flag: the bits, then the lowest job (chunk)
    /// index that showed a [`RANS_HEADER`] fault and the lowest that showed a
    /// [`RANS_DECODE`] fault (`u32::MAX` for none), and a reserved word.
    pub const WORDS: usize = 4;
    /// Index of the job word of a lane rANS fault bit in the flag words.
    #[must_use]
    pub fn job_word(bit: u32) -> Option<usize> {
        match bit {
            RANS_HEADER => Some(1),
            RANS_DECODE => Some(2),
            _ => None,
        }
    }

    /// The format library's code for the flag bits that a malformed delta
    /// raises, in the order the library checks them: the streams first
    /// (§11.2 D3; a stream that failed to decode leaves bytes that the later
    /// checks would misread), then §8.3 positions before §8.1 the changed
    /// count. `None` when no such bit is set.
    #[must_use]
    pub fn format_code(bits: u32) -> Option<tpde::ErrorCode> {
        use tpde::ErrorCode;
        if bits & RANS_HEADER != 0 {
            Some(ErrorCode::RansHeader)
        } else if bits & RANS_DECODE != 0 {
            Some(ErrorCode::RansDecode)
        } else if bits & ZERO_GAP != 0 {
            Some(ErrorCode::PositionsNotIncreasing)
        } else if bits & (POSITION_RANGE | BITMAP_PADDING) != 0 {
            Some(ErrorCode::PositionsOutOfBounds)
        } else if bits & COUNT_MISMATCH != 0 {
            Some(ErrorCode::ChangedCount)
        } else {
            None
        }
    }
}

/// Everything the GPU loader can fail with.
#[derive(Debug)]
#[non_exhaustive]
pub enum GpuError {
    /// No CUDA driver library (`libcuda.so`) could be loaded on this machine.
    NoDriver,
    /// No NVRTC library could be loaded, so the kernels cannot be compiled.
    NoNvrtc,
    /// The driver is present but no device with this ordinal exists.
    NoDevice {
        /// The requested device ordinal.
        ordinal: usize,
    },
    /// The CUDA driver loaded but panicked or lacked a symbol while starting.
    DriverLoad(String),
    /// A CUDA driver call failed.
    Driver(cudarc::driver::DriverError),
    /// NVRTC failed to compile the kernels (the log is attached).
    Compile(String),
    /// The caller passed arguments that cannot work (sizes, widths, buffers).
    InvalidArgument(String),
    /// The delta's bytes are malformed (stream sizes, codecs, zstd frames).
    Corrupt(String),
    /// A kernel raised the device error flag with no bit that a malformed
    /// delta raises (those become [`GpuError::Format`] with the library's
    /// code, see [`flag::format_code`]). The bits are those of [`flag`].
    DeviceFlag(u32),
    /// The delta uses a feature of the format that the GPU kernels do not
    /// implement; the CPU decoder of the format library reads it. (No chunk
    /// of format 1.0 is refused today: both value orders are read.)
    Unsupported(String),
    /// The format library rejected the delta (its records or bytes); the
    /// library's error carries its stable code.
    Format(tpde::Error),
}

impl GpuError {
    /// A stable, machine-readable code for this error.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoDriver => "gpu.no_driver",
            Self::NoNvrtc => "gpu.no_nvrtc",
            Self::NoDevice { .. } => "gpu.no_device",
            Self::DriverLoad(_) => "gpu.driver_load",
            Self::Driver(_) => "gpu.driver",
            Self::Compile(_) => "gpu.compile",
            Self::InvalidArgument(_) => "gpu.invalid_argument",
            Self::Corrupt(_) => "gpu.corrupt",
            Self::DeviceFlag(_) => "gpu.device_flag",
            Self::Format(_) => "gpu.format",
            Self::Unsupported(_) => "gpu.unsupported",
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Self::Corrupt(msg.into())
    }

    /// The error for device flag `bits`: the library's code where a
    /// malformed delta raised it, else [`GpuError::DeviceFlag`].
    #[must_use]
    pub fn from_flag(bits: u32) -> Self {
        match flag::format_code(bits) {
            Some(code) => {
                Self::Format(tpde::Error::new(code, format!("a GPU kernel rejected the delta (flag {bits:#x})")))
            }
            None => Self::DeviceFlag(bits),
        }
    }

    /// The format library's stable code, where the error is a fault of the
    /// delta or the base that the library reports the same way.
    #[must_use]
    pub fn format_code(&self) -> Option<tpde::ErrorCode> {
        match self {
            Self::Format(e) => Some(e.code()),
            Self::DeviceFlag(bits) => flag::format_code(*bits),
            _ => None,
        }
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver => f.write_str("no CUDA driver library (libcuda) found on this machine"),
            Self::NoNvrtc => f.write_str("no NVRTC library found; cannot compile the GPU kernels"),
            Self::NoDevice { ordinal } => write!(f, "no CUDA device with ordinal {ordinal}"),
            Self::DriverLoad(m) => write!(f, "the CUDA driver failed to load: {m}"),
            Self::Driver(e) => write!(f, "CUDA driver call failed: {e}"),
            Self::Compile(log) => write!(f, "NVRTC failed to compile the kernels: {log}"),
            Self::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Self::Corrupt(m) => write!(f, "corrupt delta: {m}"),
            Self::DeviceFlag(bits) => {
                write!(f, "a GPU kernel rejected the delta (error flag {bits:#x}:")?;
                for (bit, name) in [
                    (flag::POSITION_RANGE, " position out of range"),
                    (flag::ZERO_GAP, " zero gap"),
                    (flag::BITMAP_PADDING, " bitmap padding bit set"),
                    (flag::COUNT_MISMATCH, " value count mismatch"),
                    (flag::BAD_DESCRIPTOR, " unknown descriptor code"),
                    (flag::RANS_HEADER, " lane rANS header"),
                    (flag::RANS_DECODE, " lane rANS decode"),
                ] {
                    if bits & bit != 0 {
                        f.write_str(name)?;
                    }
                }
                f.write_str(")")
            }
            Self::Format(m) => write!(f, "format error: {m}"),
            Self::Unsupported(m) => write!(f, "not supported on the GPU: {m}"),
        }
    }
}

impl std::error::Error for GpuError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Driver(e) => Some(e),
            Self::Format(e) => Some(e),
            _ => None,
        }
    }
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e)
    }
}

impl From<tpde::Error> for GpuError {
    fn from(e: tpde::Error) -> Self {
        Self::Format(e)
    }
}

/// Result alias of this crate.
pub type Result<T, E = GpuError> = std::result::Result<T, E>;
