//! The staging ring: page-locked slots, each with its own stream, taken in
//! turn; and the two ends of every run: the flag reset that the kernels wait
//! for, and the join that reads the device error flag once.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};

use super::digests::{LeafPass, TermRows};
use super::faults::device_error;
use super::{Loader, LoaderConfig};
use crate::error::{flag, Result};
use crate::gpu::{DevRange, DeviceCopy, Gpu};
use crate::kernels::KEYS;

pub(super) struct Slot {
    pub(super) host: PinnedHostSlice<u8>,
    pub(super) dev: CudaSlice<u8>,
    pub(super) sums: CudaSlice<u64>,
    /// The group table of grouped value order: rows of [`KEYS`] `u32`.
    pub(super) groups: CudaSlice<u32>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) uploaded: CudaEvent,
    pub(super) done: CudaEvent,
    pub(super) in_use: bool,
}

impl Slot {
    pub(super) fn new(gpu: &Gpu, cfg: &LoaderConfig) -> Result<Self> {
        let ctx = gpu.context();
        let max_tiles = cfg.slot_bytes / 64 + cfg.max_chunks + 1;
        // SAFETY: the memory is uninitialized bytes; every byte is written
        // (decoded or copied) before it is uploaded, and `u8` has no invalid
        // bit patterns.
        let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(cfg.slot_bytes, 0) }?;
        Ok(Self {
            host,
            dev: gpu.alloc_zeros::<u8>(cfg.slot_bytes)?,
            sums: gpu.alloc_zeros::<u64>(max_tiles)?,
            groups: gpu.alloc_zeros::<u32>(max_group_rows(cfg) * KEYS)?,
            stream: gpu.new_stream()?,
            uploaded: ctx.new_event(None)?,
            done: ctx.new_event(None)?,
            in_use: false,
        })
    }
}

/// Rows of the group table per slot. A chunk that fits a slot has at most
/// `slot_bytes / 4096 + 1` tiles (each tile covers at least 4096 bytes of
/// decoded streams) and takes one row more; batches of many small grouped
/// chunks are cut at this bound.
fn max_group_rows(cfg: &LoaderConfig) -> usize {
    cfg.slot_bytes / 4096 + 2 * cfg.max_chunks.min(512) + 2
}

impl Loader {
    /// Starts a call at the first slot, so that calls of one batch never
    /// allocate a second. A slot still busy from a failed call is waited
    /// for by [`Loader::take_slot`], as in the middle of a call.
    pub(super) fn restart_ring(&mut self) {
        self.next = 0;
    }

    /// Allocates slots up to `batches` (at most the ring). A call that
    /// writes in place takes every slot it could use before its first
    /// write: an allocation failing part-way would leave its buffers neither
    /// base nor target.
    pub(super) fn allocate_slots(&mut self, batches: usize) -> Result<()> {
        while self.slots.len() < batches.min(self.cfg.slots) {
            self.slots.push(Slot::new(&self.gpu, &self.cfg)?);
        }
        Ok(())
    }

    /// Runs `batches`, which queues work on the slots' streams. If it fails
    /// part-way (a later chunk's header refused, an allocation), waits for
    /// what it queued before returning the error, so that no copy or kernel
    /// of the call still reads or writes memory that the caller frees on an
    /// error: the outputs of a failed `load`, or a page-locked delta.
    pub(super) fn queue(&mut self, batches: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let queued = batches(self);
        if queued.is_err() {
            // The error that stopped the call is the one to report; a wait
            // that fails too (a device fault) adds nothing to it.
            for s in &self.slots {
                s.stream.synchronize().ok();
            }
            self.gpu.stream().synchronize().ok();
        }
        queued
    }

    /// The next slot of the ring, once its last upload is done; allocated
    /// on first use.
    pub(super) fn take_slot(&mut self) -> Result<usize> {
        let i = self.next;
        self.next = (self.next + 1) % self.cfg.slots;
        if i == self.slots.len() {
            self.slots.push(Slot::new(&self.gpu, &self.cfg)?);
        }
        let s = &mut self.slots[i];
        if s.in_use {
            s.uploaded.synchronize()?;
            s.in_use = false;
        }
        Ok(i)
    }

    /// Starts the ring at its first slot, makes the base `copies` of the
    /// call and resets the device flag words on the main stream, and records
    /// `start`, which kernels wait for (the flag reset and the base copy
    /// into the output); uploads do not.
    pub(super) fn begin(&mut self, copies: &[DeviceCopy]) -> Result<()> {
        self.restart_ring();
        self.term_rows = TermRows::default();
        let main = self.gpu.stream().clone();
        self.gpu.launch_copies(&main, copies)?;
        let flag = DevRange::all(&self.flag, &main)?;
        // The bits to 0, the fault job words to u32::MAX (none).
        flag.sub(0, 4)?.fill_async(&main, 0)?;
        flag.sub(4, 4 * (flag::WORDS - 1))?.fill_async(&main, 0xFF)?;
        self.start.record(&main)?;
        Ok(())
    }

    /// Joins every slot stream into the main stream, launches the leaf
    /// digest passes there when given, copies the device error flag words
    /// back (page-locked), waits once and checks them. A lane rANS fault
    /// names its chunk: `label` gives the tensor and chunk index of the job
    /// that the kernels recorded.
    pub(super) fn finish<'n>(
        &mut self,
        label: impl Fn(u32) -> Option<(&'n str, u64)>,
        leaves: Option<&LeafPass>,
    ) -> Result<()> {
        let main = self.gpu.stream().clone();
        for s in &self.slots {
            s.done.record(&s.stream)?;
            main.wait(&s.done)?;
        }
        if let Some(pass) = leaves {
            self.launch_leaves(pass)?;
        }
        let flag = DevRange::all(&self.flag, &main)?;
        let host = self.flag_host.as_mut_slice()?;
        // SAFETY: the flag words into page-locked memory of the same length
        // that nothing else touches until the synchronize below.
        unsafe { flag.copy_to_host_async(&main, &mut host[..flag::WORDS]) }?;
        main.synchronize()?;
        let words = self.flag_host.as_slice()?;
        if words[0] != 0 {
            return Err(device_error(words, label));
        }
        Ok(())
    }
}

pub(super) fn host_prefix(host: &PinnedHostSlice<u8>, n: usize) -> Result<&[u8]> {
    Ok(&host.as_slice()?[..n])
}
