//! Reading: deltas by range, checkpoints whole.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectMeta};
use tpde::{Checkpoint, DeltaFile, Error, ErrorCode, RangeSink, RangeSource, Result};

use crate::errors::{changed, remote_error};
use crate::{runtime, Location};

/// Requests in flight at once for one read.
const IN_FLIGHT: usize = 16;

/// Ranges a checkpoint is downloaded in.
const DOWNLOAD_PART: u64 = 16 << 20;

/// What this process fetched from object stores so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// GET requests, ranged or whole.
    pub requests: u64,
    /// Bytes received in their bodies.
    pub bytes: u64,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// What this process fetched from object stores so far: for reports such as
/// "fetched 1 MiB of a 2 GiB delta".
#[must_use]
pub fn stats() -> Stats {
    Stats { requests: REQUESTS.load(Ordering::Relaxed), bytes: BYTES.load(Ordering::Relaxed) }
}

/// An object pinned at open by its size, ETag and version: every later read asks
/// for that version, with `If-Match` on the ETag, and checks what came back.
struct PinnedObject {
    at: Location,
    meta: ObjectMeta,
}

impl PinnedObject {
    async fn open(at: Location) -> Result<Self> {
        let meta = at.store.head(&at.path).await.map_err(|e| remote_error(&at, "cannot open", &e))?;
        Ok(Self { at, meta })
    }

    fn len(&self) -> u64 {
        self.meta.size
    }

    /// Reads `range` of the pinned object, passing its body to `piece` as it
    /// arrives (each piece's offset in the object, and its bytes); it must come
    /// back whole, and a body longer than asked for is refused before it is
    /// passed on, so nothing is held or allocated by the size of a response.
    async fn read(&self, range: Range<u64>, mut piece: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            if_match: self.meta.e_tag.clone(),
            version: self.meta.version.clone(),
            ..GetOptions::default()
        };
        let at = &self.at;
        let result = at.store.get_opts(&at.path, options).await.map_err(|e| remote_error(at, "cannot read", &e))?;
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        // Servers that ignore If-Match are caught here, and by the checksums.
        if result.meta.size != self.meta.size
            || (self.meta.e_tag.is_some() && result.meta.e_tag.is_some() && result.meta.e_tag != self.meta.e_tag)
        {
            return Err(changed(at, "its size or ETag differs from the one found when it was opened"));
        }
        if result.range != range {
            return Err(Error::new(
                ErrorCode::Io,
                format!("asked for bytes {range:?}, the store returned {:?}", result.range),
            )
            .in_file(&at.as_path()));
        }
        let want = range.end - range.start;
        let mut got = 0u64;
        let mut body = result.into_stream();
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| remote_error(at, "cannot read", &e))?;
            BYTES.fetch_add(part.len() as u64, Ordering::Relaxed);
            if part.len() as u64 > want - got {
                return Err(Error::new(ErrorCode::Io, format!("the store sent more than the {want} bytes asked for"))
                    .in_file(&at.as_path()));
            }
            piece(range.start + got, &part)?;
            got += part.len() as u64;
        }
        if got != want {
            return Err(Error::new(ErrorCode::Io, format!("the store sent {got} of the {want} bytes asked for"))
                .in_file(&at.as_path()));
        }
        Ok(())
    }
}

impl RangeSource for PinnedObject {
    fn len(&self) -> u64 {
        self.meta.size
    }

    fn read_ranges(&self, ranges: &[Range<u64>], sink: &RangeSink<'_>) -> Result<()> {
        runtime().block_on(
            futures::stream::iter(ranges.iter().cloned())
                .map(|range| self.read(range, |at, bytes| sink(at..at + bytes.len() as u64, bytes)))
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<()>(),
        )
    }
}

/// Opens a delta at `url` for reading by range: a HEAD (size, ETag, version), then
/// two reads for the preamble and everything after the chunks; chunks are fetched
/// as they are decoded (see [`DeltaFile::from_ranges`]).
///
/// # Errors
/// `E_REMOTE_*`, and whatever [`DeltaFile::open`] reports for a bad file.
pub fn open_delta(url: &str) -> Result<DeltaFile> {
    let at = Location::parse(url)?;
    let name = at.as_path();
    let object = runtime().block_on(PinnedObject::open(at))?;
    DeltaFile::from_ranges(&name, Arc::new(object))
}

/// A checkpoint downloaded from an object store into a temporary directory, which
/// is removed when this is dropped.
pub struct RemoteCheckpoint {
    checkpoint: Checkpoint,
    _dir: crate::LocalCopy,
}

impl std::ops::Deref for RemoteCheckpoint {
    type Target = Checkpoint;
    fn deref(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

impl RemoteCheckpoint {
    /// The checkpoint, memory-mapped from its local copy.
    #[must_use]
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The checkpoint, and the directory of its local copy, which must outlive it.
    #[must_use]
    pub fn into_parts(self) -> (Checkpoint, crate::LocalCopy) {
        (self.checkpoint, self._dir)
    }
}

/// The members of a sharded checkpoint's index that say which shards to fetch.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// Downloads a checkpoint: a `.safetensors` object, or a prefix that holds a
/// sharded checkpoint (`model.safetensors.index.json` and the shards it names),
/// into a temporary directory (under `TMPDIR`), each file by parallel ranged reads
/// pinned to its ETag. It is then opened as a local checkpoint, with every check
/// of [`Checkpoint::open`].
///
/// # Errors
/// `E_REMOTE_*`, `E_IO` for the local copy, and [`Checkpoint::open`]'s errors.
pub fn open_checkpoint(url: &str) -> Result<RemoteCheckpoint> {
    let at = Location::parse(url)?;
    let dir = crate::local_copy_dir(".tpde-download-")?;
    let name = at.file_name().unwrap_or_default();
    if [".bin", ".pt", ".pth", ".pkl", ".ckpt"].iter().any(|ext| name.ends_with(ext)) {
        // Refused before a byte is downloaded.
        return Err(Error::new(ErrorCode::PickleInput, "the checkpoint is a pickle, which is never loaded")
            .in_file(&at.as_path()));
    }
    let local = if name.ends_with(".safetensors") {
        let local = dir.path().join(&name);
        runtime().block_on(download(at.clone(), &local))?;
        local
    } else {
        let index_at = at.child(tpde::INDEX_FILE)?;
        let index_path = dir.path().join(tpde::INDEX_FILE);
        runtime().block_on(download(index_at, &index_path))?;
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, "cannot read", e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            Error::new(ErrorCode::InvalidCheckpoint, format!("{}: {e}", tpde::INDEX_FILE)).in_file(&at.as_path())
        })?;
        let shards: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
        let mut fetches = Vec::new();
        for shard in shards {
            let shard_at = at.child(shard)?;
            let local = dir.path().join(shard);
            fetches.push(async move { download(shard_at, &local).await });
        }
        runtime().block_on(futures::future::try_join_all(fetches))?;
        dir.path().to_path_buf()
    };
    let checkpoint = Checkpoint::open(&local).map_err(|e| e.in_file(&at.as_path()))?;
    Ok(RemoteCheckpoint { checkpoint, _dir: dir })
}

/// Downloads one object to `local` by parallel ranged reads of the version found
/// at the start, writing each range at its place.
async fn download(at: Location, local: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let object = PinnedObject::open(at).await?;
    if let Some(parent) = local.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create", e))?;
    }
    let file = std::fs::File::create_new(local).map_err(|e| Error::io(local, "cannot create", e))?;
    let len = object.len();
    let parts: Vec<Range<u64>> =
        (0..len.div_ceil(DOWNLOAD_PART)).map(|k| k * DOWNLOAD_PART..((k + 1) * DOWNLOAD_PART).min(len)).collect();
    let (object, file) = (&object, &file);
    futures::stream::iter(parts)
        .map(|range| {
            object.read(range, |at, bytes| {
                file.write_all_at(bytes, at).map_err(|e| Error::io(local, "cannot write the download", e))
            })
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    Ok(())
}
