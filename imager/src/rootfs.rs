//! The root filesystem tree, assembled in memory from the recipe's layers.
//!
//! Owners and modes live in the tree, never on the build host's files: a layer records what
//! the package, tarball or recipe says, and the ext4 writer applies exactly that. So a build
//! by an unprivileged user yields root-owned files. File contents are kept in a staging folder
//! (or referenced where they already are on the host) until the filesystem is written.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// What a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file whose content is the host file `content`.
    File {
        content: PathBuf,
        size: u64,
    },
    Symlink(String),
    /// A hard link to another path of the tree.
    Hardlink(PathBuf),
}

/// One entry: what it is, its permission bits (including setuid/setgid/sticky) and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    /// A symbolic link owned by root.
    pub fn symlink(target: &str) -> Node {
        Node { kind: Kind::Symlink(target.to_string()), mode: 0o777, uid: 0, gid: 0 }
    }

    /// A folder.
    pub fn dir(mode: u32, uid: u32, gid: u32) -> Node {
        Node { kind: Kind::Dir, mode, uid, gid }
    }
}

/// The assembled tree. Paths are absolute; iteration is in component order, so a directory
/// always comes before what it holds.
#[derive(Debug)]
pub struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
    staging: PathBuf,
    next_blob: u64,
}

/// A normal path component as a string.
fn normal(c: Component<'_>) -> Option<String> {
    match c {
        Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
        _ => None,
    }
}

/// Whether `name` matches `pattern`: `*` is any run of characters, `?` any one.
pub fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(a), Some(b)) if a == b => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Whether an image path holds glob characters.
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?'])
}

/// Normalises an image path: absolute, no `.` or `..`, no trailing slash.
pub fn image_path(path: &str) -> Result<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in Path::new(path.trim_start_matches("./")).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("path {path:?} leaves the image root")
            }
        }
    }
    Ok(out)
}

impl Tree {
    /// An empty tree (just `/`) whose file contents are staged under `staging`.
    pub fn new(staging: &Path) -> Result<Tree> {
        std::fs::create_dir_all(staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let mut nodes = BTreeMap::new();
        nodes.insert(PathBuf::from("/"), Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0 });
        Ok(Tree { nodes, staging: staging.to_path_buf(), next_blob: 0 })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PathBuf, &Node)> {
        self.nodes.iter()
    }

    pub fn get(&self, path: &Path) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Total bytes of regular file content.
    pub fn content_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| if let Kind::File { size, .. } = n.kind { size } else { 0 })
            .sum()
    }

    /// Makes sure every parent of `path` exists as a directory (root-owned, 0755 when created).
    fn ensure_parents(&mut self, path: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut p = path.parent();
        while let Some(dir) = p {
            match self.nodes.get(dir) {
                Some(Node { kind: Kind::Dir, .. }) => break,
                Some(Node { kind: Kind::Symlink(t), .. }) => {
                    bail!(
                        "{} is a symlink to {t}; cannot place {} under it",
                        dir.display(),
                        path.display()
                    )
                }
                Some(_) => bail!(
                    "{} is not a directory; cannot place {} under it",
                    dir.display(),
                    path.display()
                ),
                None => missing.push(dir.to_path_buf()),
            }
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            self.nodes.insert(dir, Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0 });
        }
        Ok(())
    }

    /// Inserts or replaces an entry. Replacing a directory by a non-directory drops its subtree.
    pub fn insert(&mut self, path: PathBuf, node: Node) -> Result<()> {
        if path == Path::new("/") {
            if node.kind != Kind::Dir {
                bail!("/ must be a directory");
            }
            self.nodes.insert(path, node);
            return Ok(());
        }
        self.ensure_parents(&path)?;
        if node.kind != Kind::Dir {
            if let Some(Node { kind: Kind::Dir, .. }) = self.nodes.get(&path) {
                self.remove_subtree(&path);
            }
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Stages `reader`'s bytes as the content of a new file.
    pub fn stage(&mut self, reader: &mut dyn Read) -> Result<(PathBuf, u64)> {
        let blob = self.staging.join(format!("{:08}", self.next_blob));
        self.next_blob += 1;
        let mut f =
            std::fs::File::create(&blob).with_context(|| format!("creating {}", blob.display()))?;
        let size =
            std::io::copy(reader, &mut f).with_context(|| format!("writing {}", blob.display()))?;
        Ok((blob, size))
    }

    /// Adds a regular file with the given bytes.
    pub fn add_bytes(
        &mut self,
        path: &str,
        bytes: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let (content, size) = self.stage(&mut &bytes[..])?;
        self.insert(image_path(path)?, Node { kind: Kind::File { content, size }, mode, uid, gid })
    }

    /// Adds a regular file whose content is the host file `host` (read when the filesystem is written).
    pub fn add_host_file(
        &mut self,
        path: &str,
        host: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let size =
            std::fs::metadata(host).with_context(|| format!("reading {}", host.display()))?.len();
        self.insert(
            image_path(path)?,
            Node { kind: Kind::File { content: host.to_path_buf(), size }, mode, uid, gid },
        )
    }

    /// Reads a file of the tree, following symlinks inside the tree (in any component).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let p = self.resolve(path)?;
        match self.nodes.get(&p).map(|n| &n.kind) {
            Some(Kind::File { content, .. }) => {
                std::fs::read(content).with_context(|| format!("reading {}", content.display()))
            }
            Some(Kind::Dir) => bail!("{path} is a directory in the root filesystem"),
            _ => bail!("{path} is not in the root filesystem"),
        }
    }

    /// The path that `path` names once every symlink (and hard link) on the way is followed
    /// inside the tree; a link that leaves `/` stays at `/`, as in a chroot.
    pub fn resolve(&self, path: &str) -> Result<PathBuf> {
        let mut todo: Vec<String> =
            image_path(path)?.components().rev().filter_map(normal).collect();
        let mut p = PathBuf::from("/");
        let mut links = 0;
        while let Some(name) = todo.pop() {
            let next = p.join(&name);
            match self.nodes.get(&next).map(|n| &n.kind) {
                Some(Kind::Symlink(t)) => {
                    links += 1;
                    if links > 40 {
                        bail!("{path}: too many levels of symbolic links");
                    }
                    if t.starts_with('/') {
                        p = PathBuf::from("/");
                    }
                    for c in Path::new(t).components().rev() {
                        match c {
                            Component::Normal(n) => todo.push(n.to_string_lossy().into_owned()),
                            Component::ParentDir => todo.push("..".into()),
                            _ => {}
                        }
                    }
                }
                Some(Kind::Hardlink(t)) if todo.is_empty() => p = t.clone(),
                None if name == ".." => {
                    p.pop();
                }
                None if !todo.is_empty() => bail!("{path} is not in the root filesystem"),
                _ => p = next,
            }
        }
        Ok(p)
    }

    /// The paths of the tree that match `pattern`, an absolute path whose components may hold
    /// `*` (any characters but `/`) and `?` (one character); in tree order.
    pub fn glob(&self, pattern: &str) -> Result<Vec<PathBuf>> {
        let pattern = image_path(pattern)?;
        let want: Vec<String> = pattern.components().filter_map(normal).collect();
        Ok(self
            .nodes
            .keys()
            .filter(|p| {
                let have: Vec<String> = p.components().filter_map(normal).collect();
                have.len() == want.len()
                    && want.iter().zip(&have).all(|(w, h)| wildcard(w.as_bytes(), h.as_bytes()))
            })
            .cloned()
            .collect())
    }

    /// Removes every entry that matches `pattern` (see [`Tree::glob`]) and everything under a
    /// removed folder; returns how many matched.
    pub fn remove_glob(&mut self, pattern: &str) -> Result<usize> {
        let matched = self.glob(pattern)?;
        for path in &matched {
            self.remove_subtree(path);
        }
        Ok(matched.len())
    }

    /// Removes `path` and everything under it.
    fn remove_subtree(&mut self, path: &Path) {
        let under: Vec<PathBuf> = self
            .nodes
            .range(path.to_path_buf()..)
            .map(|(p, _)| p.clone())
            .take_while(|p| p.starts_with(path))
            .collect();
        for p in under {
            self.nodes.remove(&p);
        }
    }

    /// Unpacks a tar stream, keeping its owners and modes. When `only` is not empty, entries
    /// outside those paths are skipped. Returns how many entries were added.
    pub fn add_tar(&mut self, reader: impl Read, only: &[String]) -> Result<usize> {
        let only: Vec<PathBuf> = only.iter().map(|p| image_path(p)).collect::<Result<_>>()?;
        self.add_tar_filtered(reader, &|path| {
            only.is_empty() || only.iter().any(|o| path.starts_with(o))
        })
    }

    /// Unpacks the entries of a tar stream that `keep` accepts, with their owners and modes.
    pub fn add_tar_filtered(
        &mut self,
        reader: impl Read,
        keep: &dyn Fn(&Path) -> bool,
    ) -> Result<usize> {
        let mut archive = tar::Archive::new(reader);
        let mut count = 0;
        for entry in archive.entries().context("reading tar entries")? {
            let mut entry = entry.context("reading a tar entry")?;
            let header = entry.header();
            let raw_path = entry.path().context("tar entry path")?.to_string_lossy().into_owned();
            let path = image_path(&raw_path)?;
            if !keep(&path) {
                continue;
            }
            let mode = header.mode().context("tar entry mode")? & 0o7777;
            let uid = u32::try_from(header.uid().context("tar entry uid")?)
                .context("uid out of range")?;
            let gid = u32::try_from(header.gid().context("tar entry gid")?)
                .context("gid out of range")?;
            let kind = match header.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let (content, size) = self.stage(&mut entry)?;
                    Kind::File { content, size }
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name()?.context("symlink without target")?;
                    Kind::Symlink(target.to_string_lossy().into_owned())
                }
                tar::EntryType::Link => {
                    let target = entry.link_name()?.context("hard link without target")?;
                    let target = image_path(&target.to_string_lossy())?;
                    if !self.nodes.contains_key(&target) {
                        bail!("hard link {} points at {} which is not unpacked", path.display(), target.display());
                    }
                    Kind::Hardlink(target)
                }
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
                other => bail!("{}: unsupported tar entry type {other:?} (device nodes and fifos are not supported)", path.display()),
            };
            self.insert(path, Node { kind, mode, uid, gid })?;
            count += 1;
        }
        Ok(count)
    }

    /// Copies a host folder (an overlay): files owned by root, 0755 if executable else 0644,
    /// folders 0755, symlinks kept. Entries are visited in sorted order.
    pub fn add_overlay(&mut self, dir: &Path) -> Result<usize> {
        let mut count = 0;
        let mut stack = vec![(dir.to_path_buf(), PathBuf::from("/"))];
        while let Some((host, image)) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&host)
                .with_context(|| format!("reading overlay folder {}", host.display()))?
                .collect::<std::io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                let h = e.path();
                let i = image.join(&name);
                let meta = std::fs::symlink_metadata(&h)?;
                let ft = meta.file_type();
                if ft.is_dir() {
                    self.insert(i.clone(), Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0 })?;
                    stack.push((h, i));
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(&h)?.to_string_lossy().into_owned();
                    self.insert(
                        i,
                        Node { kind: Kind::Symlink(target), mode: 0o777, uid: 0, gid: 0 },
                    )?;
                } else if ft.is_file() {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
                    self.insert(
                        i,
                        Node {
                            kind: Kind::File { content: h, size: meta.len() },
                            mode,
                            uid: 0,
                            gid: 0,
                        },
                    )?;
                } else {
                    bail!("{}: only files, folders and symlinks may be in an overlay", h.display());
                }
                count += 1;
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_glob_drops_matches_and_their_subtrees_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(dir.path()).unwrap();
        for p in [
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "/etc/ssh/sshd_config",
            "/usr/share/doc/a/README",
            "/usr/share/doc-base/keep",
        ] {
            t.add_bytes(p, b"x", 0o644, 0, 0).unwrap();
        }
        assert_eq!(t.remove_glob("/etc/ssh/ssh_host_*").unwrap(), 2);
        assert_eq!(t.remove_glob("/usr/share/doc").unwrap(), 1);
        assert_eq!(t.remove_glob("/nothing/*").unwrap(), 0);
        let left: Vec<_> = t.iter().map(|(p, _)| p.to_string_lossy().into_owned()).collect();
        assert!(left.contains(&"/etc/ssh/sshd_config".to_string()), "{left:?}");
        assert!(left.contains(&"/usr/share/doc-base/keep".to_string()), "{left:?}");
        assert!(!left.iter().any(|p| p.contains("ssh_host") || p.starts_with("/usr/share/doc/")));
    }

    #[test]
    fn reads_follow_symlinks_in_any_component_and_globs_match_components() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(dir.path()).unwrap();
        t.add_bytes("/usr/lib/linux-image-6.12/broadcom/bcm2711-rpi-4-b.dtb", b"dtb", 0o644, 0, 0)
            .unwrap();
        t.add_bytes("/usr/lib/linux-image-6.12/broadcom/bcm2711-rpi-400.dtb", b"400", 0o644, 0, 0)
            .unwrap();
        t.add_bytes("/boot/vmlinuz-6.12.1-arm64", b"kernel", 0o644, 0, 0).unwrap();
        t.insert(PathBuf::from("/lib"), Node::symlink("usr/lib")).unwrap();
        t.insert(PathBuf::from("/vmlinuz"), Node::symlink("/boot/vmlinuz-6.12.1-arm64")).unwrap();
        t.insert(PathBuf::from("/usr/lib/up"), Node::symlink("../../boot")).unwrap();
        assert_eq!(t.read("/lib/linux-image-6.12/broadcom/bcm2711-rpi-4-b.dtb").unwrap(), b"dtb");
        assert_eq!(t.read("/vmlinuz").unwrap(), b"kernel");
        assert_eq!(t.read("/lib/up/vmlinuz-6.12.1-arm64").unwrap(), b"kernel");
        assert!(t.read("/lib/nothing/here").is_err());
        assert!(format!("{:#}", t.read("/usr/lib").unwrap_err()).contains("directory"));
        let one = t.glob("/usr/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb").unwrap();
        assert_eq!(one, [PathBuf::from("/usr/lib/linux-image-6.12/broadcom/bcm2711-rpi-4-b.dtb")]);
        assert_eq!(t.glob("/boot/vmlinuz-*").unwrap().len(), 1);
        assert_eq!(t.glob("/usr/lib/linux-image-*/broadcom/bcm2711-*").unwrap().len(), 2);
        assert!(t.glob("/boot/initrd.img-*").unwrap().is_empty());
        assert!(wildcard(b"a*b?c", b"axxbyc") && !wildcard(b"a*b?c", b"abc"));
    }

    #[test]
    fn paths_normalise_and_refuse_escape() {
        assert_eq!(image_path("./usr/bin/x").unwrap(), PathBuf::from("/usr/bin/x"));
        assert_eq!(image_path("/etc/").unwrap(), PathBuf::from("/etc"));
        assert_eq!(image_path(".").unwrap(), PathBuf::from("/"));
        assert!(image_path("../etc").is_err());
        assert!(image_path("/a/../../b").is_err());
    }

    #[test]
    fn tar_keeps_owners_modes_and_links() {
        let staging = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(staging.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4755);
        h.set_uid(0);
        h.set_gid(42);
        h.set_size(5);
        b.append_data(&mut h, "./bin/tool", &b"hello"[..]).unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        l.set_mode(0o777);
        l.set_uid(0);
        l.set_gid(0);
        b.append_link(&mut l, "./bin/alias", "tool").unwrap();
        let mut hl = tar::Header::new_gnu();
        hl.set_entry_type(tar::EntryType::Link);
        hl.set_size(0);
        hl.set_mode(0o755);
        hl.set_uid(0);
        hl.set_gid(0);
        b.append_link(&mut hl, "./bin/same", "./bin/tool").unwrap();
        let data = b.into_inner().unwrap();

        assert_eq!(tree.add_tar(&data[..], &[]).unwrap(), 3);
        let tool = tree.get(Path::new("/bin/tool")).unwrap();
        assert_eq!((tool.mode, tool.uid, tool.gid), (0o4755, 0, 42));
        assert!(matches!(tree.get(Path::new("/bin")).unwrap().kind, Kind::Dir), "parent created");
        assert_eq!(tree.read("/bin/alias").unwrap(), b"hello");
        assert_eq!(tree.read("/bin/same").unwrap(), b"hello");
        assert_eq!(tree.content_bytes(), 5);

        // A filtered unpack takes only what was asked for.
        let mut t2 = Tree::new(&staging.path().join("2")).unwrap();
        assert_eq!(t2.add_tar(&data[..], &["/bin/tool".to_string()]).unwrap(), 1);
        assert!(t2.get(Path::new("/bin/alias")).is_none());
    }

    #[test]
    fn replacing_a_dir_drops_its_subtree_and_order_is_parent_first() {
        let staging = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(staging.path()).unwrap();
        tree.add_bytes("/a/b/c", b"x", 0o644, 0, 0).unwrap();
        tree.add_bytes("/a b", b"y", 0o644, 0, 0).unwrap();
        tree.add_bytes("/a", b"z", 0o600, 0, 0).unwrap();
        let paths: Vec<_> = tree.iter().map(|(p, _)| p.to_string_lossy().into_owned()).collect();
        assert_eq!(paths, ["/", "/a", "/a b"]);
        assert!(tree.add_bytes("/a/d", b"", 0o644, 0, 0).is_err(), "a file is not a folder");
    }

    #[test]
    fn overlay_files_are_root_owned_with_normalised_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sbin")).unwrap();
        std::fs::write(src.path().join("sbin/init"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.path().join("sbin/init"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(src.path().join("motd"), "hi").unwrap();
        std::fs::set_permissions(src.path().join("motd"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink("motd", src.path().join("issue")).unwrap();
        let staging = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(staging.path()).unwrap();
        assert_eq!(tree.add_overlay(src.path()).unwrap(), 4);
        assert_eq!(tree.get(Path::new("/sbin/init")).unwrap().mode, 0o755);
        assert_eq!(tree.get(Path::new("/motd")).unwrap().mode, 0o644);
        assert_eq!(tree.get(Path::new("/issue")).unwrap().kind, Kind::Symlink("motd".into()));
    }
}
