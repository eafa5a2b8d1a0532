//! The kernel command line in `boot_x/cmdline.txt`: one line whose `root=PARTUUID=` names the slot's root.

use uuid::Uuid;

/// Returns `cmdline` with its `root=` argument set to `root=PARTUUID=<partuuid>`.
///
/// An existing `root=` argument is replaced in place; otherwise one is appended. Bundles carry
/// a slot-independent boot image, so the updater calls this after writing the target slot,
/// and the imager calls it for each slot at build time.
pub fn with_root(cmdline: &str, partuuid: &Uuid) -> String {
    let root = format!("root=PARTUUID={}", partuuid.hyphenated());
    let mut found = false;
    let mut args: Vec<String> = cmdline
        .split_whitespace()
        .map(|arg| {
            if arg.starts_with("root=") {
                found = true;
                root.clone()
            } else {
                arg.to_string()
            }
        })
        .collect();
    if !found {
        args.push(root);
    }
    args.join(" ") + "\n"
}

/// The PARTUUID named by `root=PARTUUID=` in a command line, if any.
pub fn root_partuuid(cmdline: &str) -> Option<Uuid> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("root=PARTUUID="))
        .and_then(|u| Uuid::parse_str(u).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_appends_root() {
        let u = Uuid::from_u128(0x1234);
        let s = with_root("console=ttyAMA0 root=/dev/sda2 ro\n", &u);
        assert_eq!(s, format!("console=ttyAMA0 root=PARTUUID={} ro\n", u.hyphenated()));
        let s = with_root("console=ttyAMA0", &u);
        assert!(s.ends_with(&format!("root=PARTUUID={}\n", u.hyphenated())));
        assert_eq!(root_partuuid(&s), Some(u));
        assert_eq!(root_partuuid("quiet"), None);
    }
}
