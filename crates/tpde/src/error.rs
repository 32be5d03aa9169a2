//! Errors with stable codes.
//!
//! Every failure carries an [`ErrorCode`] whose string form (`E_...`) is part of the
//! public contract: tests, the conformance suite and scripts match on it, never on the
//! message text. The message names the file, tensor and chunk where known, and says
//! what to do about it.

use std::fmt;
use std::path::{Path, PathBuf};

/// The stable identity of a failure. The string form never changes once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Reading or writing a file failed at the operating-system level.
    Io,
    /// The file does not start with the tpde magic bytes (spec §2).
    BadMagic,
    /// The file ends before a structure it declares (spec §2).
    Truncated,
    /// The major version is not one this reader implements (spec §3).
    UnsupportedVersion,
    /// A required feature bit is set that this reader does not know (spec §3).
    UnknownRequiredFeature,
    /// A reserved field is not zero (spec §3).
    ReservedNonZero,
    /// The preamble checksum does not match (spec §3).
    PreambleChecksum,
    /// The header checksum does not match (spec §5).
    HeaderChecksum,
    /// The chunk or stream table checksum does not match (spec §6).
    TableChecksum,
    /// The header is not valid JSON or does not follow the schema (spec §5).
    HeaderInvalid,
    /// A JSON object holds the same key twice (spec §5).
    DuplicateKey,
    /// A declared size or count exceeds a limit of the format (spec §9).
    LimitExceeded,
    /// The trailer is missing or does not match the file length (spec §4).
    BadTrailer,
    /// Two byte ranges overlap (spec §2).
    RangeOverlap,
    /// Bytes that no structure accounts for, or padding that is not zero (spec §2).
    UnaccountedBytes,
    /// The chunk map disagrees with the tensors it describes (spec §6).
    ChunkMapInvalid,
    /// A dtype string that this format does not know (spec §7).
    UnknownDtype,
    /// An unknown encoding, value op, layout, position coding or codec id (spec §8).
    UnknownCodec,
    /// A stream decodes to a length other than the declared one (spec §8.5).
    StreamLength,
    /// A zstd stream breaks the zstd profile: several frames, trailing bytes, no
    /// content size, an oversized window (spec §8.5).
    ZstdProfile,
    /// The zstd decoder rejected a stream (spec §8.5).
    ZstdDecode,
    /// A lane rANS stream's header, tables, context or tile lengths break spec §8.7.
    RansHeader,
    /// A lane rANS tile has a state below 2^16, runs out of words, leaves words over,
    /// or ends in a state other than 2^16 (spec §8.7).
    RansDecode,
    /// Sparse positions are not strictly increasing (spec §8.3).
    PositionsNotIncreasing,
    /// A sparse position lies outside its chunk (spec §8.3).
    PositionsOutOfBounds,
    /// A chunk's declared changed count disagrees with its content (spec §8).
    ChangedCount,
    /// The stored bytes of a chunk do not match its checksum (spec §6).
    ChunkChecksum,
    /// A reconstructed chunk does not match its digest (spec §10).
    ChunkDigest,
    /// A reconstructed tensor does not match its digest (spec §10).
    TensorDigest,
    /// A chunk codes its positions against a reference delta (spec §8.3, coding 3)
    /// and the reference's positions were not given.
    ReferenceRequired,
    /// A reference delta's SHA-256 or length differs from the header's pin
    /// (spec §5.2, `position_reference`).
    ReferenceMismatch,
    /// The delta needs a base and none was given.
    BaseRequired,
    /// A tensor that the delta needs is not in the base.
    BaseMissingTensor,
    /// A base tensor has the wrong dtype or shape.
    BaseMismatch,
    /// A base tensor's bytes do not match the digest recorded in the delta.
    BaseDigest,
    /// A shard named by the index file does not exist.
    MissingShard,
    /// An input is not a valid safetensors file or sharded checkpoint.
    InvalidCheckpoint,
    /// The input is a pickle (`.bin`, `.pt`), which is never loaded.
    PickleInput,
    /// The output exists and `--force` was not given.
    OutputExists,
    /// A reconstructed file differs from the target given to `verify`.
    TargetMismatch,
    /// A caller passed an argument outside its valid range.
    InvalidArgument,
    /// Memory for decoding could not be allocated (spec §9.1).
    OutOfMemory,
    /// The caller stopped the work (Ctrl-C in a binding); nothing was left behind.
    Interrupted,
    /// A series manifest breaks `spec/SERIES.md`.
    SeriesInvalid,
    /// A step that a series does not hold, or one it cannot take.
    SeriesStep,
    /// A series file or a rebuilt step differs from the digest its manifest pins.
    SeriesDigest,
    /// Another process is changing the series.
    SeriesBusy,
    /// No credentials were found for an object store, or the store refused them
    /// as invalid (HTTP 401).
    RemoteCredentials,
    /// The object store denied access to an object (HTTP 403).
    RemoteDenied,
    /// An object, bucket or container does not exist (HTTP 404).
    RemoteNotFound,
    /// A remote object changed while it was read: its ETag or version differs from
    /// the one found when it was opened (HTTP 412 on a conditional read).
    RemoteChanged,
    /// An object store kept failing (timeouts, 5xx, throttling) after every retry.
    RemoteRetries,
}

impl ErrorCode {
    /// The stable string form, such as `E_CHUNK_CHECKSUM`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Io => "E_IO",
            Self::BadMagic => "E_BAD_MAGIC",
            Self::Truncated => "E_TRUNCATED",
            Self::UnsupportedVersion => "E_UNSUPPORTED_VERSION",
            Self::UnknownRequiredFeature => "E_UNKNOWN_REQUIRED_FEATURE",
            Self::ReservedNonZero => "E_RESERVED_NONZERO",
            Self::PreambleChecksum => "E_PREAMBLE_CHECKSUM",
            Self::HeaderChecksum => "E_HEADER_CHECKSUM",
            Self::TableChecksum => "E_TABLE_CHECKSUM",
            Self::HeaderInvalid => "E_HEADER_INVALID",
            Self::DuplicateKey => "E_DUPLICATE_KEY",
            Self::LimitExceeded => "E_LIMIT_EXCEEDED",
            Self::BadTrailer => "E_BAD_TRAILER",
            Self::RangeOverlap => "E_RANGE_OVERLAP",
            Self::UnaccountedBytes => "E_UNACCOUNTED_BYTES",
            Self::ChunkMapInvalid => "E_CHUNK_MAP_INVALID",
            Self::UnknownDtype => "E_UNKNOWN_DTYPE",
            Self::UnknownCodec => "E_UNKNOWN_CODEC",
            Self::StreamLength => "E_STREAM_LENGTH",
            Self::ZstdProfile => "E_ZSTD_PROFILE",
            Self::ZstdDecode => "E_ZSTD_DECODE",
            Self::RansHeader => "E_RANS_HEADER",
            Self::RansDecode => "E_RANS_DECODE",
            Self::PositionsNotIncreasing => "E_POSITIONS_NOT_INCREASING",
            Self::PositionsOutOfBounds => "E_POSITIONS_OUT_OF_BOUNDS",
            Self::ChangedCount => "E_CHANGED_COUNT",
            Self::ChunkChecksum => "E_CHUNK_CHECKSUM",
            Self::ChunkDigest => "E_CHUNK_DIGEST",
            Self::TensorDigest => "E_TENSOR_DIGEST",
            Self::ReferenceRequired => "E_REFERENCE_REQUIRED",
            Self::ReferenceMismatch => "E_REFERENCE_MISMATCH",
            Self::BaseRequired => "E_BASE_REQUIRED",
            Self::BaseMissingTensor => "E_BASE_MISSING_TENSOR",
            Self::BaseMismatch => "E_BASE_MISMATCH",
            Self::BaseDigest => "E_BASE_DIGEST",
            Self::MissingShard => "E_MISSING_SHARD",
            Self::InvalidCheckpoint => "E_INVALID_CHECKPOINT",
            Self::PickleInput => "E_PICKLE_INPUT",
            Self::OutputExists => "E_OUTPUT_EXISTS",
            Self::TargetMismatch => "E_TARGET_MISMATCH",
            Self::InvalidArgument => "E_INVALID_ARGUMENT",
            Self::OutOfMemory => "E_OUT_OF_MEMORY",
            Self::Interrupted => "E_INTERRUPTED",
            Self::SeriesInvalid => "E_SERIES_INVALID",
            Self::SeriesStep => "E_SERIES_STEP",
            Self::SeriesDigest => "E_SERIES_DIGEST",
            Self::SeriesBusy => "E_SERIES_BUSY",
            Self::RemoteCredentials => "E_REMOTE_CREDENTIALS",
            Self::RemoteDenied => "E_REMOTE_DENIED",
            Self::RemoteNotFound => "E_REMOTE_NOT_FOUND",
            Self::RemoteChanged => "E_REMOTE_CHANGED",
            Self::RemoteRetries => "E_REMOTE_RETRIES",
        }
    }

    /// Every code, for documentation and snapshot tests.
    pub const ALL: &'static [ErrorCode] = &[
        Self::Io,
        Self::BadMagic,
        Self::Truncated,
        Self::UnsupportedVersion,
        Self::UnknownRequiredFeature,
        Self::ReservedNonZero,
        Self::PreambleChecksum,
        Self::HeaderChecksum,
        Self::TableChecksum,
        Self::HeaderInvalid,
        Self::DuplicateKey,
        Self::LimitExceeded,
        Self::BadTrailer,
        Self::RangeOverlap,
        Self::UnaccountedBytes,
        Self::ChunkMapInvalid,
        Self::UnknownDtype,
        Self::UnknownCodec,
        Self::StreamLength,
        Self::ZstdProfile,
        Self::ZstdDecode,
        Self::RansHeader,
        Self::RansDecode,
        Self::PositionsNotIncreasing,
        Self::PositionsOutOfBounds,
        Self::ChangedCount,
        Self::ChunkChecksum,
        Self::ChunkDigest,
        Self::TensorDigest,
        Self::ReferenceRequired,
        Self::ReferenceMismatch,
        Self::BaseRequired,
        Self::BaseMissingTensor,
        Self::BaseMismatch,
        Self::BaseDigest,
        Self::MissingShard,
        Self::InvalidCheckpoint,
        Self::PickleInput,
        Self::OutputExists,
        Self::TargetMismatch,
        Self::InvalidArgument,
        Self::OutOfMemory,
        Self::Interrupted,
        Self::SeriesInvalid,
        Self::SeriesStep,
        Self::SeriesDigest,
        Self::SeriesBusy,
        Self::RemoteCredentials,
        Self::RemoteDenied,
        Self::RemoteNotFound,
        Self::RemoteChanged,
        Self::RemoteRetries,
    ];

    /// What the user can do about a failure of this kind.
    #[must_use]
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            Self::BadMagic => "is this a .tpde file?",
            Self::Truncated | Self::BadTrailer => "the file is incomplete; copy or download it again",
            Self::UnsupportedVersion => "this tpde reads format 1.x; use a tpde release that reads this version",
            Self::UnknownRequiredFeature => "the file was written by a newer tpde; upgrade tpde to read it",
            Self::PreambleChecksum
            | Self::HeaderChecksum
            | Self::TableChecksum
            | Self::ChunkChecksum
            | Self::ChunkDigest
            | Self::TensorDigest => "the file is corrupted; copy or download it again",
            Self::BaseRequired => "pass the base checkpoint as the first argument",
            Self::ReferenceRequired => {
                "this delta codes its positions against the previous delta of a series; rebuild the step with \
                 `tpde series get`"
            }
            Self::ReferenceMismatch => "pass the delta this one was written against: the previous step of its series",
            Self::BaseMissingTensor | Self::BaseMismatch | Self::BaseDigest => {
                "this delta was made against a different base checkpoint"
            }
            Self::MissingShard => "the sharded checkpoint is incomplete",
            Self::PickleInput => {
                "pickles can run code when loaded; convert to safetensors first \
                 (for example with safetensors.torch.save_file)"
            }
            Self::OutputExists => {
                "choose another output, or pass --force to replace a file or a directory holding nothing but \
                 a checkpoint"
            }
            Self::TargetMismatch => "the delta does not rebuild this target",
            Self::OutOfMemory => "free memory, or raise the process's memory limit",
            Self::SeriesInvalid => {
                "the series was not written by tpde, or was edited; restore series.json from a backup"
            }
            Self::SeriesStep => "`tpde series list` shows the steps the series holds",
            Self::SeriesDigest => "a file of the series changed on disk; restore it from a backup",
            Self::SeriesBusy => "wait for the other tpde process to finish, then run this again",
            Self::RemoteCredentials => {
                "give credentials the way the store's own tools take them (for S3: AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, a web identity token or the instance's role)"
            }
            Self::RemoteDenied => "the credentials in use may not access this object; check the bucket's policy",
            Self::RemoteNotFound => "check the URL: the bucket, the key, and for a sharded checkpoint its prefix",
            Self::RemoteChanged => "the object was replaced while tpde read it; run the command again",
            Self::RemoteRetries => {
                "the store kept failing; check the endpoint and the network, then run the command again \
                 (TPDE_REMOTE_RETRIES sets how many retries)"
            }
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure, with its stable code and where it happened.
#[derive(Debug)]
pub struct Error {
    code: ErrorCode,
    message: String,
    file: Option<PathBuf>,
    tensor: Option<String>,
    chunk: Option<u64>,
    source: Option<std::io::Error>,
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error with a code and a message that says what went wrong.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), file: None, tensor: None, chunk: None, source: None }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, action: &str, source: std::io::Error) -> Self {
        let mut err = Self::new(ErrorCode::Io, format!("{action}: {source}"));
        err.file = Some(path.to_path_buf());
        err.source = Some(source);
        err
    }

    /// Names the file the error is about, unless one is named already.
    #[must_use]
    pub fn in_file(mut self, path: &Path) -> Self {
        self.file.get_or_insert_with(|| path.to_path_buf());
        self
    }

    /// Names the tensor the error is about, unless one is named already.
    #[must_use]
    pub fn in_tensor(mut self, name: &str) -> Self {
        self.tensor.get_or_insert_with(|| name.to_owned());
        self
    }

    /// Names the chunk the error is about, unless one is named already.
    #[must_use]
    pub fn in_chunk(mut self, index: u64) -> Self {
        self.chunk.get_or_insert(index);
        self
    }

    /// The stable code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message, without code or location.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The file the error is about, if known.
    #[must_use]
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The tensor the error is about, if known.
    #[must_use]
    pub fn tensor(&self) -> Option<&str> {
        self.tensor.as_deref()
    }

    /// The global chunk index the error is about, if known.
    #[must_use]
    pub fn chunk(&self) -> Option<u64> {
        self.chunk
    }
}

/// Whether printing `c` could drive a terminal or hide text from a reader of a log:
/// control characters (C0, DEL, C1: `ESC`, `CSI`, `BEL`, newlines) and the Unicode
/// controls that reorder text (bidirectional embeddings, overrides and isolates).
fn is_unsafe_to_print(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character that could drive a terminal escaped, as `ls` and `git`
/// do: `\t`, `\n` and `\r`, others as `\u{1b}`. Names in files are untrusted, so
/// everything printed for people (errors, `inspect` tables, logs) goes through this;
/// JSON output does not need it, as JSON escapes control characters itself.
#[must_use]
pub fn escape_for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write;
    if !text.chars().any(is_unsafe_to_print) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_unsafe_to_print(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

impl fmt::Display for Error {
    /// One line, with every name and message escaped for a terminal
    /// ([`escape_for_terminal`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, escape_for_terminal(&self.message))?;
        let mut sep = " (";
        if let Some(file) = &self.file {
            write!(f, "{sep}file {}", escape_for_terminal(&file.display().to_string()))?;
            sep = ", ";
        }
        if let Some(tensor) = &self.tensor {
            write!(f, "{sep}tensor {}", escape_for_terminal(&format!("{tensor:?}")))?;
            sep = ", ";
        }
        if let Some(chunk) = self.chunk {
            write!(f, "{sep}chunk {chunk}")?;
            sep = ", ";
        }
        if sep == ", " {
            f.write_str(")")?;
        }
        if let Some(hint) = self.code.hint() {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for `Err(Error::new(code, message))`.
pub(crate) fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T> {
    Err(Error::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(escape_for_terminal("plain.weight ünïcode"), "plain.weight ünïcode");
        assert!(matches!(escape_for_terminal("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(escape_for_terminal("a\x1b[31mred\x07"), "a\\u{1b}[31mred\\u{7}");
        assert_eq!(escape_for_terminal("t\tn\nr\r"), "t\\tn\\nr\\r");
        assert_eq!(escape_for_terminal("\u{9b}2J\u{7f}"), "\\u{9b}2J\\u{7f}");
        assert_eq!(escape_for_terminal("abc\u{202e}fed"), "abc\\u{202e}fed");
    }

    /// Regression: errors printed file and tensor names raw, so a hostile name
    /// could drive the terminal.
    #[test]
    fn an_error_prints_no_control_character() {
        let err = Error::new(ErrorCode::BaseDigest, "the file \x1b]0;title\x07 differs")
            .in_file(Path::new("dir/\x1b[2Jbase.safetensors"))
            .in_tensor("w\x1b[31m\u{202e}")
            .in_chunk(3);
        let text = err.to_string();
        assert!(!text.chars().any(is_unsafe_to_print), "{text}");
        assert!(text.contains("\\u{1b}[2Jbase.safetensors") && text.contains("\\u{202e}"), "{text}");
    }
}
