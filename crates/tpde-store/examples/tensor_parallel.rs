//! One rank's share of a tensor-parallel load, with the delta in an object store:
//! the rank opens the delta by URL and rebuilds its even share of the rows of every
//! tensor through `DeltaModel::decode_rows_into` (tensors of one row, or fewer rows
//! than ranks, whole), which fetches only the chunks that overlap those rows.
//! Prints the bytes it fetched against an even share of the delta.
//!
//! ```text
//! cargo run --release -p tpde-store --example tensor_parallel -- DELTA_URL RANKS RANK [BASE]
//! ```
//!
//! The store's configuration comes from the environment (`AWS_*` for S3).

use std::path::PathBuf;

use tpde::{even_row_shard, Checkpoint, DeltaModel, NoProgress};

type R<T> = Result<T, Box<dyn std::error::Error>>;

#[allow(clippy::cast_precision_loss)] // ratios for display
fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, ranks, rank, base) = match args.as_slice() {
        [url, ranks, rank] => (url, ranks, rank, None),
        [url, ranks, rank, base] => (url, ranks, rank, Some(base)),
        _ => return Err("usage: tensor_parallel DELTA_URL RANKS RANK [BASE]".into()),
    };
    let (ranks, rank): (u64, u64) = (ranks.parse()?, rank.parse()?);
    if rank >= ranks {
        return Err("RANK must be below RANKS".into());
    }
    let delta = tpde_store::open_delta(url)?;
    let opened = tpde_store::stats();
    let file_len = delta.file_len();
    let chunk_total: u64 = (0..delta.preamble().chunk_count).map(|i| u64::from(delta.chunk(i).stored_len)).sum();
    let base = base.map(|b| Checkpoint::open(&PathBuf::from(b))).transpose()?;
    let model = DeltaModel::new(delta, base.map(|b| Box::new(b) as tpde::OwnedSource))?;
    let mut rebuilt = 0u64;
    for tensor in model.tensors() {
        let bytes = if let Some(rows) = even_row_shard(&tensor.shape, rank, ranks) {
            let row_bytes = DeltaModel::row_bytes(tensor)?.ok_or("a tensor without whole-byte rows")?;
            let mut out = vec![0u8; usize::try_from((rows.end - rows.start) * row_bytes)?];
            model.decode_rows_into(tensor, rows, &mut out, &NoProgress)?;
            out.len()
        } else {
            let mut out = vec![0u8; usize::try_from(tensor.byte_len()?)?];
            model.decode_into(tensor, &mut out, &NoProgress)?;
            out.len()
        };
        rebuilt += bytes as u64;
    }
    let fetched = tpde_store::stats();
    let chunks_fetched = fetched.bytes - opened.bytes;
    let share = chunk_total as f64 / ranks as f64;
    println!(
        "rank {rank} of {ranks}: rebuilt {rebuilt} bytes; fetched {} bytes in {} requests: metadata {} at open, \
         then {chunks_fetched} bytes of chunks = {:.3} x an even share of the chunks ({:.3} x an even share of \
         the file, metadata included)",
        fetched.bytes,
        fetched.requests,
        opened.bytes,
        chunks_fetched as f64 / share.max(1.0),
        fetched.bytes as f64 / (file_len as f64 / ranks as f64),
    );
    Ok(())
}
