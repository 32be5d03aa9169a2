//! A tensor-parallel load: each of N ranks rebuilds only its share of the rows
//! of every tensor (the row shards of column-parallel layers; tensors of one
//! row, or fewer rows than ranks, whole on every rank), and reads only the
//! delta's chunks that overlap them. Prints, per rank, the stored bytes of the
//! chunks it decodes against an even share of the delta's, and checks that the
//! ranks' rows put together are the whole target, bit for bit.
//!
//! ```text
//! cargo run --release -p tpde --example tensor_parallel -- BASE DELTA RANKS
//! ```
//!
//! Each rank reads only its chunks' bytes of the base too: a partial read checks
//! them through the rebuilt chunks' digests (spec §11.2, partial reads).

use std::path::PathBuf;

use tpde::{even_row_shard, Checkpoint, DeltaFile, DeltaModel, NoProgress};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, delta, ranks] = args.as_slice() else {
        return Err("usage: tensor_parallel BASE DELTA RANKS".into());
    };
    let ranks: u64 = ranks.parse()?;
    if ranks == 0 {
        return Err("RANKS must be at least 1".into());
    }
    let delta = DeltaFile::open(&PathBuf::from(delta))?;
    let chunk_total: u64 = (0..delta.preamble().chunk_count).map(|i| u64::from(delta.chunk(i).stored_len)).sum();
    let metadata = delta.file_len() - chunk_total;
    let model = DeltaModel::new(delta, Some(Box::new(Checkpoint::open(&PathBuf::from(base))?)))?;
    println!(
        "{} tensors, delta {} bytes: chunks {chunk_total}, metadata (preamble, header, chunk map) {metadata}",
        model.tensors().len(),
        model.delta().file_len()
    );
    println!("| rank | rows rebuilt (bytes) | chunk bytes read | × an even share of the chunks |\n|---|---|---|---|");
    let mut whole: Vec<Vec<u8>> = model.tensors().iter().map(|_| Vec::new()).collect();
    for rank in 0..ranks {
        let (mut read, mut rebuilt) = (0u64, 0u64);
        for (t, tensor) in model.tensors().iter().enumerate() {
            let shard = even_row_shard(&tensor.shape, rank, ranks);
            let split = shard.is_some();
            let (start, end, bytes) = if let Some(rows) = shard {
                let row_bytes = DeltaModel::row_bytes(tensor)?.ok_or("a tensor without whole-byte rows")?;
                let mut out = vec![0u8; usize::try_from((rows.end - rows.start) * row_bytes)?];
                model.decode_rows_into(tensor, rows.clone(), &mut out, &NoProgress)?;
                (rows.start * row_bytes, rows.end * row_bytes, out)
            } else {
                let mut out = vec![0u8; usize::try_from(tensor.byte_len()?)?];
                model.decode_into(tensor, &mut out, &NoProgress)?;
                (0, tensor.byte_len()?, out)
            };
            // The chunks that overlap the rows' bytes.
            let chunk_bytes = tensor.chunk_words * tensor.word_width()?.bytes_u64();
            if end > start {
                for k in start / chunk_bytes..end.div_ceil(chunk_bytes) {
                    read += u64::from(model.delta().chunk(tensor.first_chunk + k).stored_len);
                }
            }
            rebuilt += bytes.len() as u64;
            // Row shards are put together in rank order; whole tensors once.
            if split || rank == 0 {
                whole[t].extend_from_slice(&bytes);
            }
        }
        let share = chunk_total as f64 / ranks as f64;
        println!("| {rank} | {rebuilt} | {read} | {:.3} |", read as f64 / share.max(1.0));
    }
    for (tensor, bytes) in model.tensors().iter().zip(&whole) {
        let mut full = vec![0u8; usize::try_from(tensor.byte_len()?)?];
        model.decode_into(tensor, &mut full, &NoProgress)?;
        if &full != bytes {
            return Err(format!("{}: the ranks' rows differ from the whole tensor", tensor.name).into());
        }
    }
    println!("the ranks' rows put together are every tensor of the target, bit for bit");
    Ok(())
}
