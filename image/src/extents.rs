//! Where a sparse file holds data, by `SEEK_DATA`/`SEEK_HOLE`, and copying just those parts.

use std::fs::File;
use std::io;

use rustix::fs::SeekFrom;

/// Data extents `(offset, len)` of `file` within `start..end`, in order. File systems that
/// cannot tell holes report everything as data, which is merely slower.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(offset) => offset,
            // ENXIO: no data at or after `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?.min(end);
        extents.push((data, hole - data));
        pos = hole;
    }
    Ok(extents)
}

/// Copies the data extents of `from` into `to` at `to_offset`, leaving holes as holes.
/// Returns the bytes copied.
pub fn copy_sparse(from: &File, to: &File, to_offset: u64) -> io::Result<u64> {
    let len = from.metadata()?.len();
    let mut copied = 0;
    for (offset, extent) in data_extents(from, 0, len)? {
        let mut off_in = offset;
        let mut off_out = to_offset + offset;
        let mut left = extent;
        while left > 0 {
            let chunk = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
            let n = rustix::fs::copy_file_range(
                from,
                Some(&mut off_in),
                to,
                Some(&mut off_out),
                chunk,
            )?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while being copied",
                ));
            }
            left -= n as u64;
        }
        copied += extent;
    }
    Ok(copied)
}
