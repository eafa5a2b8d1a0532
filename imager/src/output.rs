//! Output files next to the image: sparse copies, `.img.zst`, `.bmap`, hashes.
//!
//! The image is sparse: only the ranges the build wrote hold data. Those ranges (found with
//! `SEEK_DATA`/`SEEK_HOLE`) are what the `.bmap` maps and what `imager flash` writes.

use crate::progress::Progress;
use anyhow::{Context, Result};
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Reads the next piece of a decompressed `.img.zst` (`zst`): until `buf` is full or the
/// stream ends; returns the bytes read. A truncated or corrupt stream is blamed on zstd, by
/// name, with how much of the image (`done` bytes) came out before it stopped.
pub fn read_zstd_piece(r: &mut dyn Read, buf: &mut [u8], zst: &Path, done: u64) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let at = updater::units::size(done + filled as u64);
                let msg = format!(
                    "{}: the zstd stream is truncated or corrupt (it stopped after {at} of the image)",
                    zst.display()
                );
                return Err(anyhow::Error::new(e).context(msg));
            }
        }
    }
    Ok(filled)
}

/// Block size of the bmap.
pub const BMAP_BLOCK: u64 = 4096;

/// The byte ranges of `file` that hold data, as `(start, end)`, in order.
pub fn data_ranges(file: &File) -> Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(e).context("seeking to data"),
        };
        let end = lseek(fd, start, Whence::SeekHole).context("seeking to a hole")?;
        ranges.push((start as u64, end as u64));
        pos = end;
    }
    Ok(ranges)
}

/// Copies the data ranges of `src` into `dst` at `offset`, leaving holes as holes.
pub fn copy_sparse(src: &File, dst: &File, offset: u64) -> Result<u64> {
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    let (mut s, mut d) = (src, dst);
    for (start, end) in data_ranges(src)? {
        s.seek(SeekFrom::Start(start))?;
        d.seek(SeekFrom::Start(offset + start))?;
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.read_exact(&mut buf[..n])?;
            d.write_all(&buf[..n])?;
            left -= n as u64;
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// sha256 of `len` bytes of `file` from `start` (holes read as zeros).
/// Uses positioned reads, so threads may hash ranges of one file at once.
pub fn sha256_range(file: &File, start: u64, len: u64) -> Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], start + pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of a whole file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    sha256_range(&f, 0, len)
}

/// Compresses `src` into `dst` with zstd at `level` on every core. zstd's multi-threaded
/// output does not depend on the number of workers, so the result is reproducible.
pub fn compress_zstd(src: &Path, dst: &Path, level: i32, progress: &Progress) -> Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = input.metadata()?.len();
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut enc = zstd::stream::Encoder::new(std::io::BufWriter::new(out), level)?;
    let workers = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1).max(1);
    enc.multithread(workers).context("enabling zstd workers")?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(len))?;
    let step = progress.bytes(len, "compressing");
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n])?;
        step.inc(n as u64);
    }
    enc.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    step.finish();
    Ok(())
}

/// The bmap's mapped blocks: data ranges widened to whole blocks and merged.
pub fn bmap_ranges(data: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in data {
        let (first, last) = (start / BMAP_BLOCK, (end - 1) / BMAP_BLOCK);
        match blocks.last_mut() {
            Some((_, l)) if first <= *l + 1 => *l = (*l).max(last),
            _ => blocks.push((first, last)),
        }
    }
    blocks
}

/// Writes the image's block map in bmaptool's XML format 2.0 with sha256 checksums.
pub fn write_bmap(image: &Path, dst: &Path) -> Result<u64> {
    let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    let blocks = bmap_ranges(&data_ranges(&file)?);
    let mapped: u64 = blocks.iter().map(|(f, l)| l - f + 1).sum();
    let total = size.div_ceil(BMAP_BLOCK);
    let mut ranges = String::new();
    for &(first, last) in &blocks {
        let start = first * BMAP_BLOCK;
        let end = ((last + 1) * BMAP_BLOCK).min(size);
        let sum = sha256_range(&file, start, end - start)?;
        let span = if first == last { first.to_string() } else { format!("{first}-{last}") };
        let _ = writeln!(ranges, "        <Range chksum=\"{sum}\"> {span} </Range>");
    }
    let render = |checksum: &str| {
        format!(
            "<?xml version=\"1.0\" ?>\n\
             <!-- Block map of {name}, written by the Metrica imager. -->\n\
             <bmap version=\"2.0\">\n\
             \x20   <ImageSize> {size} </ImageSize>\n\
             \x20   <BlockSize> {BMAP_BLOCK} </BlockSize>\n\
             \x20   <BlocksCount> {total} </BlocksCount>\n\
             \x20   <MappedBlocksCount> {mapped} </MappedBlocksCount>\n\
             \x20   <ChecksumType> sha256 </ChecksumType>\n\
             \x20   <BmapFileChecksum> {checksum} </BmapFileChecksum>\n\
             \x20   <BlockMap>\n{ranges}    </BlockMap>\n\
             </bmap>\n",
            name = image.file_name().unwrap_or_default().to_string_lossy(),
        )
    };
    // The file checksum is taken with its own field set to zeros, as bmaptool checks it.
    let zeros = "0".repeat(64);
    let checksum = hex::encode(Sha256::digest(render(&zeros).as_bytes()));
    std::fs::write(dst, render(&checksum)).with_context(|| format!("writing {}", dst.display()))?;
    Ok(mapped * BMAP_BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("disk.img");
        let mut f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[1u8; 10_000]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[2u8; 4096]).unwrap();
        f.sync_all().unwrap();
        path
    }

    #[test]
    fn ranges_and_sparse_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let f = File::open(&path).unwrap();
        let r = data_ranges(&f).unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].0 <= 1 << 20 && r[0].1 >= (1 << 20) + 10_000);
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(128 << 20).unwrap();
        copy_sparse(&f, &dst, 8 << 20).unwrap();
        assert_eq!(
            sha256_range(&dst, 8 << 20, 64 << 20).unwrap(),
            sha256_range(&f, 0, 64 << 20).unwrap()
        );
        assert!(
            data_ranges(&dst).unwrap().iter().map(|(s, e)| e - s).sum::<u64>() < 8 << 20,
            "stays sparse"
        );
    }

    #[test]
    fn bmap_block_ranges_merge() {
        assert_eq!(bmap_ranges(&[(0, 4096), (4096, 8193), (40960, 40961)]), vec![(0, 2), (10, 10)]);
        assert_eq!(bmap_ranges(&[]), vec![]);
    }

    #[test]
    fn bmap_is_accepted_by_bmaptool() {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_file(dir.path());
        let bmap = dir.path().join("disk.bmap");
        let mapped = write_bmap(&img, &bmap).unwrap();
        assert!(mapped >= 10_000 + 4096);
        let text = std::fs::read_to_string(&bmap).unwrap();
        assert!(text.contains("<ChecksumType> sha256 </ChecksumType>"));
        let copy = dir.path().join("copy.img");
        let out = std::process::Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(&bmap)
            .arg(&img)
            .arg(&copy)
            .output()
            .expect("bmaptool is installed (.ci/setup installs bmap-tools)");
        assert!(out.status.success(), "bmaptool: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha256_file(&copy).unwrap(), sha256_file(&img).unwrap());

        // A bmap whose checksum does not match the image is refused by bmaptool.
        let pos = text.find("chksum=\"").unwrap() + 8;
        let flipped = if &text[pos..=pos] == "0" { "1" } else { "0" };
        let mut tampered = text;
        tampered.replace_range(pos..=pos, flipped);
        std::fs::write(&bmap, tampered).unwrap();
        let out = std::process::Command::new("bmaptool")
            .args(["copy", "--bmap"])
            .arg(&bmap)
            .arg(&img)
            .arg(dir.path().join("copy2.img"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "bmaptool must refuse a tampered bmap");
    }

    #[test]
    fn zstd_is_reproducible_and_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_file(dir.path());
        let (a, b) = (dir.path().join("a.zst"), dir.path().join("b.zst"));
        compress_zstd(&img, &a, 3, &Progress::quiet()).unwrap();
        compress_zstd(&img, &b, 3, &Progress::quiet()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let decoded = zstd::decode_all(File::open(&a).unwrap()).unwrap();
        assert_eq!(decoded, std::fs::read(&img).unwrap());
    }
}
