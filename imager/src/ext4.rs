//! ext4 filesystems from a [`Tree`], with e2fsprogs and no root.
//!
//! `mke2fs` makes an empty filesystem with fixed UUID, hash seed and features (from a
//! committed `mke2fs.conf`, so the host's defaults do not leak in), then one `debugfs -w` run
//! populates it from a script written in the tree's order, setting each entry's owner and mode
//! from the tree. `E2FSPROGS_FAKE_TIME` pins every timestamp to `SOURCE_DATE_EPOCH`. The result
//! depends only on the tree and the parameters: bit-identical across runs, folders and users.
//! (`mke2fs -d` was not used: e2fsprogs 1.47.0 takes owners from the source files and adds
//! entries in `readdir` order, which depends on the host filesystem.)

use crate::cmd::CommandExt;
use crate::progress::Progress;
use crate::rootfs::{Kind, Tree};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const INODE_RATIO: u64 = 16384;

/// The mke2fs configuration used for every filesystem, so builds do not depend on the host's.
const MKE2FS_CONF: &str = "\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 0
	lazy_itable_init = false
	lazy_journal_init = false
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
";

/// What to make.
#[derive(Debug, Clone)]
pub struct Ext4Params<'a> {
    /// Partition name for messages, e.g. `root_a`.
    pub name: &'a str,
    pub label: &'a str,
    pub size: u64,
    pub uuid: uuid::Uuid,
    pub hash_seed: uuid::Uuid,
    /// `SOURCE_DATE_EPOCH`: every timestamp in the filesystem.
    pub epoch: u64,
    /// A journal for read-write filesystems (`data`); the read-only roots need none.
    pub journal: bool,
}

/// A conservative estimate of the bytes a tree needs as ext4 with these parameters.
pub fn estimate(tree: &Tree, size: u64, journal: bool) -> u64 {
    let blocks: u64 = tree
        .iter()
        .map(|(_, n)| match &n.kind {
            Kind::File { size, .. } => size.div_ceil(BLOCK) + size.div_ceil(BLOCK * 340), // data + extent blocks
            Kind::Dir => 1,
            Kind::Symlink(t) if t.len() >= 60 => 1,
            _ => 0,
        })
        .sum();
    let inode_tables = size / INODE_RATIO * INODE_SIZE;
    let journal_bytes = if journal { journal_size(size) } else { 0 };
    // Bitmaps, group descriptors, reserved GDT blocks and slack: 3% plus 1 MiB.
    let overhead = size / 33 + (1 << 20);
    blocks * BLOCK + inode_tables + journal_bytes + overhead
}

/// mke2fs's default journal size for a filesystem of `size` bytes (ext2fs_default_journal_size).
fn journal_size(size: u64) -> u64 {
    let blocks = size / BLOCK;
    let jblocks = match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        _ => 32768,
    };
    jblocks * BLOCK
}

/// Writes an ext4 filesystem holding `tree` into the file `out` (created, sparse, `size` bytes).
pub fn build(tree: &Tree, out: &Path, p: &Ext4Params<'_>, progress: &Progress) -> Result<()> {
    let needed = estimate(tree, p.size, p.journal);
    if needed > p.size {
        bail!(too_small(p, needed));
    }
    let work = tempfile::tempdir().context("creating a temporary folder")?;
    let conf = work.path().join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF)?;
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(p.size)?;
    drop(f);

    let mut mkfs = Command::new(crate::cmd::tool("mke2fs"));
    mkfs.env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", p.epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-L", p.label, "-U"])
        .arg(p.uuid.hyphenated().to_string())
        .arg("-E")
        .arg(format!("hash_seed={},root_owner=0:0,nodiscard", p.hash_seed.hyphenated()));
    if !p.journal {
        mkfs.args(["-O", "^has_journal"]);
    }
    mkfs.arg(out).arg(format!("{}k", p.size / 1024));
    mkfs.run_checked().with_context(|| format!("making the {} filesystem", p.name))?;

    if tree.is_empty() {
        return Ok(());
    }
    let (script, commands) = script(tree)?;
    let script_path = work.path().join("populate.debugfs");
    std::fs::write(&script_path, script)?;

    let bar = progress.bar(commands as u64, &format!("populating {}", p.name));
    let mut child = Command::new(crate::cmd::tool("debugfs"))
        .env("E2FSPROGS_FAKE_TIME", p.epoch.to_string())
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .logged()
        .spawn()
        .context("running debugfs (is e2fsprogs installed?)")?;
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect::<Vec<_>>()
    });
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        if line?.starts_with("debugfs: ") {
            bar.inc(1);
        }
    }
    let status = child.wait()?;
    let errors = errors.join().expect("stderr reader");
    bar.finish();
    if errors.iter().any(|e| e.contains("Could not allocate") || e.contains("No free space")) {
        bail!(too_small(p, needed.max(p.size + (1 << 20))));
    }
    if !status.success() || !errors.is_empty() {
        bail!("populating the {} filesystem failed: {}", p.name, errors.join("; "));
    }
    Ok(())
}

fn too_small(p: &Ext4Params<'_>, needed: u64) -> String {
    format!(
        "partition {} is too small for its content: it needs about {} MiB, the recipe gives {} MiB",
        p.name,
        needed.div_ceil(1 << 20),
        p.size >> 20
    )
}

fn quote(path: &Path) -> Result<String> {
    let s = path.to_string_lossy();
    if s.contains('"') || s.chars().any(char::is_control) {
        bail!("{s:?}: file names with '\"' or control characters are not supported");
    }
    Ok(format!("\"{s}\""))
}

/// The debugfs script that creates every entry of the tree, and the number of commands in it.
fn script(tree: &Tree) -> Result<(String, usize)> {
    use std::os::unix::fs::MetadataExt;
    let mut s = String::new();
    let mut n = 0;
    let mut links: BTreeMap<&Path, u32> = BTreeMap::new();
    let mut hardlinks = Vec::new();
    let mut cmd = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
        n += 1;
    };
    for (path, node) in tree.iter() {
        let q = quote(path)?;
        // What debugfs gives a new entry, so only differences need a `sif`.
        let (type_bits, default_mode) = match &node.kind {
            Kind::Dir => {
                if path != Path::new("/") {
                    cmd(&mut s, format!("mkdir {q}"));
                }
                (0o040000, 0o755)
            }
            Kind::File { content, .. } => {
                cmd(&mut s, format!("write {} {q}", quote(content)?));
                let host = std::fs::metadata(content)
                    .with_context(|| format!("reading {}", content.display()))?;
                (0o100000, host.mode() & 0o7777)
            }
            Kind::Symlink(target) => {
                if target.contains('"') || target.chars().any(char::is_control) {
                    bail!("{}: symlink target {target:?} is not supported", path.display());
                }
                cmd(&mut s, format!("symlink {q} \"{target}\""));
                (0o120000, 0o777)
            }
            Kind::Hardlink(target) => {
                // Linked after everything else: the target may sort after the link.
                hardlinks.push(format!("ln {} {q}", quote(target)?));
                *links.entry(target.as_path()).or_insert(1) += 1;
                continue;
            }
        };
        if node.mode != default_mode {
            cmd(&mut s, format!("sif {q} mode 0{:o}", type_bits | node.mode));
        }
        if node.uid != 0 {
            cmd(&mut s, format!("sif {q} uid {}", node.uid));
        }
        if node.gid != 0 {
            cmd(&mut s, format!("sif {q} gid {}", node.gid));
        }
    }
    for line in hardlinks {
        cmd(&mut s, line);
    }
    for (target, count) in links {
        let q = quote(target)?;
        let _ = writeln!(s, "sif {q} links_count {count}");
        n += 1;
    }
    Ok((s, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(size: u64) -> Ext4Params<'static> {
        Ext4Params {
            name: "root_a",
            label: "root_a",
            size,
            uuid: uuid::Uuid::from_u128(1),
            hash_seed: uuid::Uuid::from_u128(2),
            epoch: 1_700_000_000,
            journal: false,
        }
    }

    fn sample_tree(staging: &Path) -> Tree {
        let mut tree = Tree::new(staging).unwrap();
        tree.add_bytes("/bin/busybox", &[7u8; 10_000], 0o4755, 0, 0).unwrap();
        tree.add_bytes("/etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42).unwrap();
        tree.add_bytes("/home/pi/notes", b"mine", 0o600, 1000, 1000).unwrap();
        tree.insert("/bin/sh".into(), crate::rootfs::Node::symlink("busybox")).unwrap();
        tree.insert(
            "/bin/ash".into(),
            crate::rootfs::Node {
                kind: Kind::Hardlink("/bin/busybox".into()),
                mode: 0o4755,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        tree.insert("/tmp".into(), crate::rootfs::Node::dir(0o1777, 0, 0)).unwrap();
        tree
    }

    #[test]
    fn owners_modes_links_and_reproducibility() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(&dir.path().join("staging"));
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        build(&tree, &a, &params(32 << 20), &Progress::quiet()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        build(&tree, &b, &params(32 << 20), &Progress::quiet()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "same tree, same bytes");

        let fs = ext4_view::Ext4::load_from_path(&a).unwrap();
        let m = fs.metadata("/bin/busybox").unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o4755));
        let m = fs.metadata("/etc/shadow").unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 42, 0o640));
        let m = fs.metadata("/home/pi/notes").unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o600));
        assert_eq!(fs.metadata("/tmp").unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(fs.read_link("/bin/sh").unwrap(), ext4_view::PathBuf::new("busybox"));
        assert_eq!(fs.read("/bin/ash").unwrap(), vec![7u8; 10_000]);
        assert_eq!(fs.metadata("/bin/busybox").unwrap().modified().seconds(), 1_700_000_000);
        assert_eq!(fs.label().to_str().unwrap(), "root_a");
    }

    #[test]
    fn too_small_says_how_much_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(&dir.path().join("staging")).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![1u8; 12 << 20]).unwrap();
        tree.add_host_file("/big", &big, 0o644, 0, 0).unwrap();
        let e = build(&tree, &dir.path().join("x.ext4"), &params(8 << 20), &Progress::quiet())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("partition root_a is too small")
                && e.contains("needs about")
                && e.contains("gives 8 MiB"),
            "{e}"
        );
    }
}
