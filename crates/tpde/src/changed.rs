//! Which words of a chunk differ from the base's: the first pass of every chunk
//! encoded against a base, over both checkpoints' bytes.

use crate::codec::values::Word;

/// The indices of the words that differ between `target` and `base` (as long as
/// each other), ascending.
pub(crate) fn changed_words<W: Word>(target: &[W], base: &[W]) -> Vec<u32> {
    debug_assert_eq!(target.len(), base.len());
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the features `available` checks.
        return unsafe { avx512::changed_words(W::as_bytes(target), W::as_bytes(base), W::BYTES) };
    }
    changed_words_scalar(target, base)
}

/// [`changed_words`] on any CPU. Branch-free: whether a word changed is close to
/// a coin flip in dense updates, which a branch would mispredict half the time.
/// Eight words are compared at once into a mask, and the mask's set bits become
/// indices through a table, all eight written and as many kept as changed. It
/// runs on blocks in a stack buffer, so that the list is never zeroed in advance.
fn changed_words_scalar<W: Word>(target: &[W], base: &[W]) -> Vec<u32> {
    const BLOCK: usize = 256;
    let mut changed = Vec::with_capacity(target.len());
    let mut block = [0u32; BLOCK];
    for (at, (t, b)) in (0u32..).step_by(BLOCK).zip(target.chunks(BLOCK).zip(base.chunks(BLOCK))) {
        let mut count = 0;
        let (t8, b8) = (t.chunks_exact(8), b.chunks_exact(8));
        let tail = (t8.remainder(), b8.remainder());
        for (first, (t, b)) in (at..).step_by(8).zip(t8.zip(b8)) {
            let mask = (0..8).fold(0u8, |mask, k| mask | u8::from(t[k] != b[k]) << k);
            // `count` is at most the words before this eight, so all eight fit.
            for (slot, &bit) in block[count..count + 8].iter_mut().zip(&SET_BITS[usize::from(mask)]) {
                *slot = first + u32::from(bit);
            }
            count += mask.count_ones() as usize;
        }
        let tail_at = at + u32::try_from(t.len() - tail.0.len()).expect("a block fits u32");
        for (i, (t, b)) in (tail_at..).zip(tail.0.iter().zip(tail.1)) {
            block[count] = i;
            count += usize::from(t != b);
        }
        changed.extend_from_slice(&block[..count]);
    }
    changed
}

/// For each byte, the places of its set bits, lowest first, then zeros.
const SET_BITS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let (mut bit, mut count) = (0u8, 0);
        while bit < 8 {
            if byte >> bit & 1 == 1 {
                table[byte][count] = bit;
                count += 1;
            }
            bit += 1;
        }
        byte += 1;
    }
    table
};

/// [`changed_words`] 64 bytes at a time: one compare gives a mask of the words
/// that differ, and one compress per 16 words packs their indices, where the
/// scalar loop compares word by word and looks each byte of the mask up in a table.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Indices gathered before they are appended to the list: the list's spare
    /// room is never written, so it is never zeroed in advance.
    const BLOCK: usize = 1024;

    pub(super) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("popcnt")
    }

    /// # Safety
    /// The CPU must have the features of [`available`]; `word_bytes` is 1, 2, 4
    /// or 8, and `target` and `base` are whole words, as long as each other.
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    pub(super) unsafe fn changed_words(target: &[u8], base: &[u8], word_bytes: usize) -> Vec<u32> {
        let len = target.len().min(base.len());
        let words_per_vector = 64 / word_bytes;
        let mut changed = Vec::with_capacity(len / word_bytes);
        // Room for a whole vector's 64 indices past any count below BLOCK.
        let mut block = [0u32; BLOCK + 64];
        let mut count = 0;
        let mut first = 0u32;
        let mut at = 0;
        // SAFETY (whole body): loads read 64 bytes at `at + 64 <= len`; each
        // store writes 16 indices at `count + 16 <= BLOCK + 64`, as `count` stays
        // below BLOCK before a vector and grows by at most 64 within it.
        unsafe {
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            while at + 64 <= len {
                let t = _mm512_loadu_si512(target.as_ptr().add(at).cast());
                let b = _mm512_loadu_si512(base.as_ptr().add(at).cast());
                let mut mask: u64 = match word_bytes {
                    1 => _mm512_cmpneq_epi8_mask(t, b),
                    2 => u64::from(_mm512_cmpneq_epi16_mask(t, b)),
                    4 => u64::from(_mm512_cmpneq_epi32_mask(t, b)),
                    _ => u64::from(_mm512_cmpneq_epi64_mask(t, b)),
                };
                for sixteen in (first..).step_by(16).take(words_per_vector.div_ceil(16)) {
                    #[allow(clippy::cast_possible_truncation)] // the low 16 bits
                    let bits = mask as u16;
                    #[allow(clippy::cast_possible_wrap)] // an index below 2^31
                    let indices = _mm512_add_epi32(iota, _mm512_set1_epi32(sixteen as i32));
                    _mm512_storeu_si512(
                        block.as_mut_ptr().add(count).cast(),
                        _mm512_maskz_compress_epi32(bits, indices),
                    );
                    count += bits.count_ones() as usize;
                    mask >>= 16;
                }
                first += u32::try_from(words_per_vector).expect("at most 64");
                at += 64;
                if count >= BLOCK {
                    changed.extend_from_slice(&block[..count]);
                    count = 0;
                }
            }
        }
        changed.extend_from_slice(&block[..count]);
        let words = target[at..len].chunks_exact(word_bytes).zip(base[at..len].chunks_exact(word_bytes));
        changed.extend((first..).zip(words).filter(|(_, (t, b))| t != b).map(|(i, _)| i));
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words of width `W` that differ from the base in a share of places, by one bit
    /// anywhere in the word.
    fn check_width<W: Word + std::fmt::Debug>(word: impl Fn(u64) -> W) {
        let mut noise = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise
        };
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000, 4099, 70_000] {
            for changed_in_256 in [0u64, 1, 128, 255, 256] {
                let base: Vec<W> = (0..len).map(|_| word(next())).collect();
                let target: Vec<W> = base
                    .iter()
                    .map(|&b| {
                        let r = next();
                        if r & 0xFF < changed_in_256 {
                            word(r >> 8)
                        } else {
                            b
                        }
                    })
                    .collect();
                let expected: Vec<u32> =
                    (0..len).filter(|&i| target[i] != base[i]).map(|i| u32::try_from(i).unwrap()).collect();
                let context = format!("{} bytes a word, {len} words, {changed_in_256} in 256", W::BYTES);
                assert_eq!(changed_words_scalar(&target, &base), expected, "scalar, {context}");
                assert_eq!(changed_words(&target, &base), expected, "{context}");
            }
        }
    }

    /// Both paths list exactly the words that differ, at every width, density, block
    /// edge and tail.
    #[test]
    fn changed_words_are_those_that_differ() {
        #[cfg(target_arch = "x86_64")]
        if !avx512::available() {
            eprintln!("no AVX-512 BW on this CPU: only the scalar path is checked");
        }
        #[allow(clippy::cast_possible_truncation)] // words cut from noise
        {
            check_width(|r| r as u8);
            check_width(|r| r as u16);
            check_width(|r| r as u32);
            check_width(|r| r);
        }
    }
}
