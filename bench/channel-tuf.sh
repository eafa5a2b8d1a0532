#!/usr/bin/env bash
# Channel format evaluation (issue 7 item 2; docs/design.md "Channels: a plain signed document
# rather than TUF metadata"): the same job done two ways, in scratch crates outside the
# workspace, in the same run:
#   tough-eval: tough loads and verifies a small TUF repository (its own test data: root,
#               timestamp, snapshot, targets) from file:// URLs and reads one target;
#   plain-eval: updater::channel verifies a signed channel document, rollout::decide runs;
# plus the updater binary itself. Prints release binary sizes, peak RSS (max of 3 runs) and
# the ratios tough / plain and tough / updater.
#
# Environment: BENCH_DIR (work folder; default a new one in /var/tmp, removed at the end unless
# BENCH_KEEP=1; an existing one is reused, builds included). Needs the crate registry.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/metrica-tuf.XXXXXX)}
mkdir -p "$WORK"
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
PROFILE='[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = true
panic = "abort"'

mkdir -p "$WORK/tough-eval/src" "$WORK/plain-eval/src/bin"
cat > "$WORK/tough-eval/Cargo.toml" <<EOF
[package]
name = "tough-eval"
version = "0.1.0"
edition = "2021"

[dependencies]
tough = "0.24"
tokio = { version = "1", features = ["rt", "macros"] }
url = "2"
futures = "0.3"

$PROFILE
EOF
cat > "$WORK/tough-eval/src/main.rs" <<'EOF'
//! Load and verify a small TUF repository with tough, then read and verify one target.
//! Usage: tough-eval METADATA_DIR TARGETS_DIR TARGET_NAME
use std::path::Path;
use tough::{RepositoryLoader, TargetName};
use url::Url;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (meta, targets, name) = (Path::new(&args[1]), Path::new(&args[2]), &args[3]);
    let root = std::fs::read(meta.join("1.root.json")).expect("root");
    let repo = RepositoryLoader::new(
        &root,
        Url::from_directory_path(std::fs::canonicalize(meta).unwrap()).unwrap(),
        Url::from_directory_path(std::fs::canonicalize(targets).unwrap()).unwrap(),
    )
    .load()
    .await
    .expect("load and verify the repository");
    let target = TargetName::new(name.as_str()).unwrap();
    let mut stream = repo.read_target(&target).await.expect("read").expect("target exists");
    let mut n = 0usize;
    use futures::StreamExt;
    while let Some(chunk) = stream.next().await {
        n += chunk.expect("verified chunk").len();
    }
    println!("verified {name}: {n} bytes; {} targets", repo.targets().signed.targets.len());
}
EOF
cat > "$WORK/plain-eval/Cargo.toml" <<EOF
[package]
name = "plain-eval"
version = "0.1.0"
edition = "2021"

[dependencies]
updater = { path = "$TOP/updater" }
ed25519-dalek = "2.1"

$PROFILE
EOF
cp "$TOP/Cargo.lock" "$WORK/plain-eval/Cargo.lock"
cat > "$WORK/plain-eval/src/main.rs" <<'EOF'
//! Verify a signed channel document and decide. Usage: plain-eval FOLDER NAME KEYRING
use std::path::Path;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (folder, name, keys) = (Path::new(&a[1]), &a[2], Path::new(&a[3]));
    let doc = std::fs::read(folder.join(updater::channel::document_path(name))).unwrap();
    let sig = std::fs::read(folder.join(updater::channel::signature_path(name))).ok();
    let ring = updater::sign::Keyring::load(keys).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let e = updater::channel::Expect { keyring: &ring, name, last_sequence: None, now };
    let v = updater::channel::verify(&doc, sig.as_deref(), &e).expect("verified");
    let d = updater::rollout::DeviceFacts {
        device_id: "pi-1".into(),
        segment: updater::channel::Segment::General,
        compatible: v.channel.os.compatible.clone(),
        committed_version: None,
        security_epoch: 0,
    };
    let dec = updater::rollout::decide(&v.channel, &d, &Default::default(), &Default::default(), now);
    println!("verified {name} sequence {} by {}: {dec}", v.channel.sequence, v.key_id);
}
EOF
cat > "$WORK/plain-eval/src/bin/make.rs" <<'EOF'
//! Writes a signed sample channel (FOLDER/channels/stable.toml + .sig) and its keyring (KEYS/).
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (folder, keys) = (std::path::Path::new(&a[1]), std::path::Path::new(&a[2]));
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    std::fs::create_dir_all(folder.join("channels")).unwrap();
    std::fs::create_dir_all(keys).unwrap();
    std::fs::write(keys.join("fleet.pub.pem"), updater::sign::public_key_to_pem(&key.verifying_key())).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let t = |s: u64| updater::channel::Timestamp(s);
    let text = format!(r#"format = 1
name = "stable"
sequence = 3
published = {}
expires = {}
[os]
compatible = "metrica-rpi4-arm64"
version = "2.0.0"
urls = ["../bundles/pi-2.0.0.mfb"]
size = 412345678
sha256 = "{}"
security_epoch = 1
[os.rollout]
percent = 5
waves = [{{ at = {}, percent = 5 }}, {{ at = {}, percent = 100 }}]
"#, t(now - 60), t(now + 86400), "ab".repeat(32), t(now - 60), t(now + 3600));
    let ch = updater::channel::Channel::parse(text.as_bytes()).unwrap();
    let (doc, sig) = ch.sign(&key);
    std::fs::write(folder.join("channels/stable.toml"), doc).unwrap();
    std::fs::write(folder.join("channels/stable.toml.sig"), sig).unwrap();
}
EOF

echo "building (release, LTO; the first build of tough takes minutes)..." >&2
cargo build --quiet --release --manifest-path "$WORK/tough-eval/Cargo.toml"
cargo build --quiet --release --manifest-path "$WORK/plain-eval/Cargo.toml"
# The updater binary with the same profile, in the scratch target (never the workspace's).
cargo build --quiet --release --manifest-path "$TOP/Cargo.toml" -p updater \
  --target-dir "$WORK/plain-eval/target"

TOUGH=$WORK/tough-eval/target/release/tough-eval
PLAIN=$WORK/plain-eval/target/release/plain-eval
UPDATER=$WORK/plain-eval/target/release/updater
REPO=$(cargo metadata --format-version 1 --manifest-path "$WORK/tough-eval/Cargo.toml" \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print([p["manifest_path"] for p in m["packages"] if p["name"]=="tough"][0])')
REPO=$(dirname "$REPO")/tests/data/tuf-reference-impl
rm -rf "$WORK/channel"
"$WORK/plain-eval/target/release/make" "$WORK/channel/www" "$WORK/channel/keys"

peak() { # max RSS in KiB of 3 runs of "$@"
  local best=0 kb
  for _ in 1 2 3; do
    kb=$( { /usr/bin/time -f '%M' "$@" >/dev/null; } 2>&1 | tail -1)
    [ "$kb" -gt "$best" ] && best=$kb
  done
  echo "$best"
}
size() { stat -c %s "$1"; }
t_rss=$(peak "$TOUGH" "$REPO/metadata" "$REPO/targets" file1.txt)
p_rss=$(peak "$PLAIN" "$WORK/channel/www" stable "$WORK/channel/keys")
u_rss=$(peak "$UPDATER" --help)
t_size=$(size "$TOUGH"); p_size=$(size "$PLAIN"); u_size=$(size "$UPDATER")
printf '%-44s %12s %10s\n' program "binary (B)" "peak RSS"
printf '%-44s %12s %7s KiB\n' "tough: load + verify TUF repo + 1 target" "$t_size" "$t_rss"
printf '%-44s %12s %7s KiB\n' "plain: verify channel document + decide" "$p_size" "$p_rss"
printf '%-44s %12s %7s KiB\n' "updater (whole CLI, --help)" "$u_size" "$u_rss"
awk -v ts="$t_size" -v ps="$p_size" -v us="$u_size" -v tr="$t_rss" -v pr="$p_rss" 'BEGIN {
  printf "size ratio tough/plain %.2f, tough/updater %.2f; peak RSS ratio tough/plain %.2f\n",
    ts / ps, ts / us, tr / pr }'
