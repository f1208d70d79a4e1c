//! `scan`: one record per adapter file, errors as records, the flags of docs/scan.md. Each file
//! is read into memory (at most `scan::MAX_SCAN_ADAPTER_BYTES`) through `load::fsguard`, so a
//! file truncated or replaced under a running scan gives an error record for that file, never a
//! crash of the scan (issue #14, finding 6).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::load::{Adapter, FileDigest, LoadOptions};
use crate::report::{InspectReport, SpectrumReport};
use crate::scan::{
    Candidate, ErrorKind, Findings, Flag, FlagThresholds, ScanError, ScanRecord, MAX_SCAN_ADAPTER_BYTES,
};
use crate::spectral::{within_abs_limit, SpectrumOptions};

fn fill_from_inspect(rec: &mut ScanRecord, r: &InspectReport) {
    let a = &r.adapter;
    rec.bytes = r.inputs.first().map(|i| i.bytes);
    rec.sha256 = Some(a.hashes.sha256.clone());
    rec.autov2 = Some(a.hashes.autov2.clone());
    rec.content_hash = a.hashes.autov3.clone();
    rec.format = Some(a.format.clone());
    rec.architecture = Some(a.architecture.clone());
    rec.modules = Some(a.modules.len());
    rec.kinds = a.kinds.clone();
    rec.params = Some(a.params);
    rec.train_images = a.metadata.training.images();
    rec.train_steps = a.metadata.training.max_train_steps;
    rec.resolution = a.metadata.training.resolution.clone();
    rec.top_tags = a.metadata.training.tags.iter().take(10).cloned().collect();
    rec.warnings = r.warnings.clone();
}

fn fill_from_spectrum(rec: &mut ScanRecord, s: &SpectrumReport) {
    rec.effective_params = Some(s.totals.effective_params);
    rec.capacity_bits = Some(s.totals.capacity_bits);
    rec.capacity_bits_per_image = s.totals.capacity_bits_per_image;
}

/// Scan one file or PEFT directory: never fails; problems become the record's `error`.
pub fn scan_one(c: &Candidate, opts: &SpectrumOptions, th: &FlagThresholds) -> ScanRecord {
    let path = c.path.as_path();
    let mut rec = ScanRecord { path: path.to_string_lossy().into_owned(), ..Default::default() };
    let mut read: Option<Arc<Vec<u8>>> = None;
    // A panic while reading one file is a bug of lorascope, not a reason to lose the scan: it
    // becomes this file's internal error record.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let r = Adapter::read(path, c.tree.as_ref(), MAX_SCAN_ADAPTER_BYTES)?;
        read = Some(r.bytes.clone());
        // AutoV3 always: it is the record's content hash, computed from the bytes already read.
        let adapter = Adapter::parse_read(path, r, &LoadOptions { autov3: true, ..Default::default() })?;
        let mut refused_values = false;
        let inspect = match super::spectrum(&adapter, None, opts, &|| {}) {
            Ok(s) => {
                fill_from_spectrum(&mut rec, &s);
                s.inspect
            }
            // Bad values (NaN/Inf, beyond MAX_ABS_VALUE, an overflow) stop the spectrum but not
            // the screen, nor do the spectrum's other input errors.
            Err(e) if e.is_input() => {
                refused_values = matches!(e, Error::Values { .. });
                let mut r = super::inspect(&adapter, None)?;
                r.warnings.push(format!("spectrum not computed: {e}"));
                r
            }
            Err(e) => return Err(e),
        };
        fill_from_inspect(&mut rec, &inspect);
        let modules = &inspect.adapter.modules;
        let nonfinite = modules.iter().any(|m| m.nonfinite > 0);
        let extreme = modules.iter().any(|m| m.extreme > 0 || !within_abs_limit(m.scale));
        let found = Findings {
            nonfinite,
            hash_mismatch: inspect.adapter.hashes.sshs_model_hash.as_ref().is_some_and(|c| !c.matches),
            mixed_naming: adapter.mixed_naming(),
            // A refusal for values that no NaN/Inf explains is an overflow: flagged with them.
            extreme_values: extreme || (refused_values && !nonfinite),
        };
        rec.flags = crate::scan::flags_for(&rec, found, th);
        Ok(())
    }))
    .unwrap_or_else(|payload| {
        Err(Error::Internal(format!("lorascope panicked: {}", crate::error::panic_text(payload.as_ref()))))
    });
    if let Err(e) = result {
        let kind = match e {
            Error::Refused { .. } => ErrorKind::Skipped,
            _ if e.is_input() => ErrorKind::Input,
            _ => ErrorKind::Internal,
        };
        rec.error = Some(ScanError { kind, message: e.to_string() });
        rec.flags = vec![Flag::Unreadable];
        // The hash of a bad file is still worth recording: of the bytes that were read (none
        // when the file was refused or over the limit).
        if let Some(bytes) = read {
            let d = FileDigest::of(&bytes);
            rec.autov2 = Some(d.sha256[..10].to_string());
            rec.sha256 = Some(d.sha256);
            rec.bytes = Some(d.bytes);
        }
    }
    rec
}

/// What a scan saw, for the summary.
#[derive(Debug, Default)]
pub struct ScanSummary {
    pub files: usize,
    pub errors: usize,
    /// Of the errors, files not opened at all (links out of the tree, FIFOs, sockets, devices).
    pub skipped: usize,
    /// Files carrying each flag.
    pub flags: std::collections::BTreeMap<Flag, usize>,
    /// Files carrying a flag named in `fail_on`.
    pub failing: usize,
}

/// Scan `files` on `jobs` threads, handing each record to `emit` in path order (workers run
/// ahead within a chunk, so the output order never depends on timing).
pub fn scan_all(
    files: &[Candidate],
    jobs: usize,
    opts: &SpectrumOptions,
    th: &FlagThresholds,
    fail_on: &[Flag],
    tick: &(dyn Fn() + Sync),
    emit: &mut dyn FnMut(&ScanRecord),
) -> Result<ScanSummary> {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| crate::error::Error::Internal(format!("thread pool: {e}")))?;
    let mut sum = ScanSummary { files: files.len(), ..Default::default() };
    for chunk in files.chunks(jobs.max(1) * 8) {
        let records: Vec<ScanRecord> = pool.install(|| {
            chunk
                .par_iter()
                .map(|p| {
                    let r = scan_one(p, opts, th);
                    tick();
                    r
                })
                .collect()
        });
        for r in &records {
            sum.errors += usize::from(r.error.is_some());
            sum.skipped += usize::from(r.error.as_ref().is_some_and(|e| e.kind == ErrorKind::Skipped));
            for f in &r.flags {
                *sum.flags.entry(*f).or_default() += 1;
            }
            sum.failing += usize::from(r.flags.iter().any(|f| fail_on.contains(f)));
            emit(r);
        }
    }
    Ok(sum)
}
