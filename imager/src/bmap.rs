//! Reading block maps (`.bmap`, bmaptool's XML format 2.x with sha256 checksums): the ranges of
//! an image that hold data, each with its checksum. Pure: text in, [`Bmap`] or a [`BmapError`]
//! naming the field or range out. `output::write_bmap` writes the same format.
//!
//! The `bmap-parser` crate was looked at and not used: it panics on a malformed range, does not
//! check the file's own checksum, the range order or the ranges against the image size, and
//! pulls a second sha2 and an async runtime trait stack (docs/design.md "Flashing").

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;

/// A parsed, checked block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    /// Size of the image in bytes.
    pub image_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Mapped ranges, in order, not overlapping.
    pub ranges: Vec<MappedRange>,
}

/// One `<Range>`: blocks `first..=last`, bytes `start..end` (the last block may be cut by the
/// image's end), and the sha256 of those bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRange {
    pub first: u64,
    pub last: u64,
    pub start: u64,
    pub end: u64,
    pub sha256: [u8; 32],
}

impl MappedRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

impl fmt::Display for MappedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "block {} (bytes {}..{})", self.first, self.start, self.end)
        } else {
            write!(f, "blocks {}-{} (bytes {}..{})", self.first, self.last, self.start, self.end)
        }
    }
}

impl Bmap {
    /// Bytes the ranges cover.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(MappedRange::len).sum()
    }

    /// Parses and checks a bmap document.
    pub fn parse(text: &str) -> Result<Bmap, BmapError> {
        let doc: Doc = quick_xml::de::from_str(text).map_err(|e| BmapError::Xml(e.to_string()))?;
        let version = doc.version.trim();
        if version.split('.').next() != Some("2") {
            return Err(BmapError::Version(version.to_string()));
        }
        // First the file's own checksum: an edited or damaged file is reported as such.
        let file_sum = doc.bmap_file_checksum.trim();
        let file_sum_bytes = digest("BmapFileChecksum", file_sum)?;
        // bmaptool's rule: the sha256 of the file with this field's value set to zeros.
        let zeroed = text.replace(file_sum, &"0".repeat(file_sum.len()));
        let actual: [u8; 32] = Sha256::digest(zeroed.as_bytes()).into();
        if actual != file_sum_bytes {
            return Err(BmapError::FileChecksum {
                expected: file_sum.to_string(),
                actual: hex::encode(actual),
            });
        }

        let image_size = number("ImageSize", &doc.image_size)?;
        let block_size = number("BlockSize", &doc.block_size)?;
        if block_size == 0 || block_size % 512 != 0 {
            return Err(field("BlockSize", "a positive multiple of 512", &doc.block_size));
        }
        let blocks = number("BlocksCount", &doc.blocks_count)?;
        if blocks != image_size.div_ceil(block_size) {
            return Err(field(
                "BlocksCount",
                &format!("{} (ImageSize / BlockSize, rounded up)", image_size.div_ceil(block_size)),
                &doc.blocks_count,
            ));
        }
        let mapped_count = number("MappedBlocksCount", &doc.mapped_blocks_count)?;
        if doc.checksum_type.trim() != "sha256" {
            return Err(field("ChecksumType", "sha256", &doc.checksum_type));
        }
        let mut ranges: Vec<MappedRange> = Vec::new();
        let mut counted = 0u64;
        for (i, r) in doc.block_map.ranges.iter().enumerate() {
            let bad = |problem: String| BmapError::Range {
                index: i + 1,
                text: r.span.trim().to_string(),
                problem,
            };
            let span = r.span.trim();
            let (a, b) = span.split_once('-').unwrap_or((span, span));
            let parse = |s: &str| {
                s.trim().parse::<u64>().map_err(|_| bad("expected FIRST-LAST or BLOCK".into()))
            };
            let (first, last) = (parse(a)?, parse(b)?);
            if first > last {
                return Err(bad("the first block is after the last".into()));
            }
            if last >= blocks {
                return Err(bad(format!("past the image's end (it has {blocks} blocks)")));
            }
            if let Some(prev) = ranges.last() {
                if first <= prev.last {
                    return Err(bad(format!(
                        "overlaps or comes before the range before it (which ends at block {})",
                        prev.last
                    )));
                }
            }
            let sha256 = digest("chksum", r.chksum.trim()).map_err(|e| bad(e.to_string()))?;
            counted += last - first + 1;
            ranges.push(MappedRange {
                first,
                last,
                start: first * block_size,
                end: ((last + 1) * block_size).min(image_size),
                sha256,
            });
        }
        if counted != mapped_count {
            return Err(field(
                "MappedBlocksCount",
                &format!("{counted} (the blocks of the ranges)"),
                &doc.mapped_blocks_count,
            ));
        }
        Ok(Bmap { image_size, block_size, ranges })
    }
}

/// What is wrong with a bmap document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BmapError {
    #[error("not a bmap document: {0}")]
    Xml(String),
    #[error("bmap version {0:?} is not supported: expected 2.x (sha256 checksums), as written by the imager or `bmaptool create`")]
    Version(String),
    #[error("<{field}>: expected {expected}, found {found:?}")]
    Field { field: &'static str, expected: String, found: String },
    #[error("<Range> number {index} ({text:?}): {problem}")]
    Range { index: usize, text: String, problem: String },
    #[error("<BmapFileChecksum> is {expected} but the file's checksum is {actual}: the bmap was edited or damaged")]
    FileChecksum { expected: String, actual: String },
}

fn field(field: &'static str, expected: &str, found: &str) -> BmapError {
    BmapError::Field { field, expected: expected.to_string(), found: found.trim().to_string() }
}

fn number(name: &'static str, text: &str) -> Result<u64, BmapError> {
    text.trim().parse().map_err(|_| field(name, "a whole number", text))
}

fn digest(name: &'static str, text: &str) -> Result<[u8; 32], BmapError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| field(name, "a sha256 (64 hex digits)", text))?;
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct Doc {
    #[serde(rename = "@version")]
    version: String,
    #[serde(rename = "ImageSize")]
    image_size: String,
    #[serde(rename = "BlockSize")]
    block_size: String,
    #[serde(rename = "BlocksCount")]
    blocks_count: String,
    #[serde(rename = "MappedBlocksCount")]
    mapped_blocks_count: String,
    #[serde(rename = "ChecksumType")]
    checksum_type: String,
    #[serde(rename = "BmapFileChecksum")]
    bmap_file_checksum: String,
    #[serde(rename = "BlockMap")]
    block_map: BlockMap,
}

#[derive(Debug, Deserialize)]
struct BlockMap {
    #[serde(rename = "Range", default)]
    ranges: Vec<RangeDoc>,
}

#[derive(Debug, Deserialize)]
struct RangeDoc {
    #[serde(rename = "@chksum")]
    chksum: String,
    #[serde(rename = "$text")]
    span: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// A bmap written by the imager's own writer for a small sparse file.
    fn written() -> (String, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        let mut f = std::fs::File::create(&img).unwrap();
        f.set_len(10 * 4096 + 100).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        f.seek(SeekFrom::Start(10 * 4096)).unwrap();
        f.write_all(&[9u8; 100]).unwrap();
        drop(f);
        let bmap = dir.path().join("x.bmap");
        crate::output::write_bmap(&img, &bmap).unwrap();
        (std::fs::read_to_string(bmap).unwrap(), std::fs::read(img).unwrap())
    }

    /// Re-signs an edited document the way bmaptool does, so that edits reach the other checks.
    fn resign(text: &str) -> String {
        let start = text.find("<BmapFileChecksum>").unwrap() + "<BmapFileChecksum>".len();
        let end = text.find("</BmapFileChecksum>").unwrap();
        let old = text[start..end].trim().to_string();
        let zeroed = text.replace(&old, &"0".repeat(64));
        let sum = hex::encode(Sha256::digest(zeroed.as_bytes()));
        zeroed.replace(&"0".repeat(64), &sum)
    }

    #[test]
    fn reads_what_the_imager_writes() {
        let (text, bytes) = written();
        let b = Bmap::parse(&text).unwrap();
        assert_eq!((b.image_size, b.block_size), (10 * 4096 + 100, 4096));
        assert_eq!(b.ranges.len(), 2, "{b:?}");
        assert_eq!((b.ranges[0].first, b.ranges[0].last), (0, 1));
        assert_eq!((b.ranges[1].start, b.ranges[1].end), (40960, 41060), "cut at the image end");
        for r in &b.ranges {
            let sum: [u8; 32] = Sha256::digest(&bytes[r.start as usize..r.end as usize]).into();
            assert_eq!(sum, r.sha256, "{r}");
        }
        assert_eq!(b.mapped_bytes(), 8192 + 100);
        assert_eq!(b.ranges[1].to_string(), "block 10 (bytes 40960..41060)");
    }

    #[test]
    fn reads_what_bmaptool_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("y.img");
        let mut f = std::fs::File::create(&img).unwrap();
        f.set_len(1 << 20).unwrap();
        f.seek(SeekFrom::Start(64 << 10)).unwrap();
        f.write_all(&[3u8; 70_000]).unwrap();
        f.sync_all().unwrap();
        let out = std::process::Command::new("bmaptool")
            .arg("create")
            .arg(&img)
            .output()
            .expect("bmaptool is installed (.ci/setup installs bmap-tools)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let b = Bmap::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
        assert_eq!(b.image_size, 1 << 20);
        assert!(b.ranges.iter().any(|r| r.start <= 64 << 10 && r.end >= (64 << 10) + 70_000));
    }

    #[test]
    fn bad_documents_name_the_field_or_range() {
        let (text, _) = written();
        let first_sum = {
            let p = text.find("chksum=\"").unwrap() + 8;
            text[p..p + 64].to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            ("not xml at all".into(), "not a bmap document"),
            (resign(&text.replace("version=\"2.0\"", "version=\"1.4\"")), "version \"1.4\""),
            (
                resign(
                    &text.replace("<ImageSize> 41060 </ImageSize>", "<ImageSize> 4x </ImageSize>"),
                ),
                "<ImageSize>: expected a whole number, found \"4x\"",
            ),
            (resign(&text.replace("<BlockSize> 4096", "<BlockSize> 100")), "<BlockSize>"),
            (
                resign(&text.replace("<BlocksCount> 11", "<BlocksCount> 12")),
                "<BlocksCount>: expected 11",
            ),
            (
                resign(&text.replace("<MappedBlocksCount> 3", "<MappedBlocksCount> 4")),
                "<MappedBlocksCount>: expected 3",
            ),
            (resign(&text.replace("> sha256 <", "> sha1 <")), "<ChecksumType>: expected sha256"),
            (
                resign(&text.replace("> 0-1 <", "> 1-0 <")),
                "<Range> number 1 (\"1-0\"): the first block is after",
            ),
            (
                resign(&text.replace("> 10 <", "> 11 <")),
                "<Range> number 2 (\"11\"): past the image's end",
            ),
            (resign(&text.replace("> 10 <", "> 1 <")), "<Range> number 2 (\"1\"): overlaps"),
            (
                resign(&text.replace("> 10 <", "> ten <")),
                "<Range> number 2 (\"ten\"): expected FIRST-LAST",
            ),
            (
                resign(&text.replace(&first_sum, "abc")),
                "<Range> number 1 (\"0-1\"): <chksum>: expected a sha256",
            ),
            // An edit without a new file checksum: the file's own checksum catches it.
            (text.replace("> 10 <", "> 9 <"), "<BmapFileChecksum> is"),
        ];
        for (doc, want) in cases {
            let e = Bmap::parse(&doc).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }
}
