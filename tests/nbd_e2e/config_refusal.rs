//! tandemd refuses to start on a broken configuration or on a backing it must
//! not serve (blank, another volume's, corrupt, truncated), saying why; and it
//! serves — after repairing it — a backing with one damaged superblock copy.

use std::path::Path;

use tandem_tests::{
    block_on, inspect, read_file_at, tandemd_must_refuse, write_file_at, Daemon, Rng,
};

const VOL: u64 = 64 << 20;
const UUID_A: &str = "0b6f2a4c-1d2e-4f30-8a5b-6c7d8e9fa0b1";
const UUID_B: &str = "f0e1d2c3-b4a5-4968-8776-655443322110";

fn assert_mentions(stderr: &str, needles: &[&str], what: &str) {
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: tandemd's message does not mention {n:?}:\n{stderr}"
        );
    }
}

/// A prepared (not started) daemon with volume "vol" and a config file.
fn with_config(toml: &str) -> (Daemon, String) {
    let mut d = Daemon::builder()
        .volume_with("vol", VOL, &["--uuid", UUID_A])
        .prepare();
    let p = d.set_config(toml);
    let p = p.display().to_string();
    (d, p)
}

#[test]
fn broken_config_files_are_refused_with_file_and_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown top-level field",
            "[nbd]\nunix = \"{dir}/x.sock\"\nbogus_field = 1\n[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\n",
            &["bogus_field"],
        ),
        (
            "unknown export field",
            "[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\ncolour = \"red\"\n",
            &["colour"],
        ),
        (
            "bad uuid",
            "[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\nuuid = \"not-a-uuid\"\n",
            &["export[0].uuid", "not-a-uuid"],
        ),
        (
            "bad engine",
            "[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\nengine = \"turbo\"\n",
            &["turbo"],
        ),
        (
            "duplicate export names",
            "[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\n[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\n",
            &["export[1].name"],
        ),
        (
            "queue depth not a power of two",
            "[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\nqueue_depth = 100\n",
            &["export[0].queue_depth", "100"],
        ),
        ("TOML syntax error", "[[export]\nname = \n", &[]),
        ("no exports", "[log]\nlevel = \"info\"\n", &["export"]),
    ];
    for (what, toml, needles) in cases {
        let (d, path) = with_config(toml);
        let stderr = d.must_refuse();
        assert_mentions(&stderr, &[&path], what);
        assert_mentions(&stderr, needles, what);
    }

    // A missing config file, and bad command-line values.
    let dir = tandem_tests::temp_dir();
    let missing = dir.path().join("nope.toml");
    let s = dir.path().join("s.sock").display().to_string();
    let stderr = tandemd_must_refuse(&[
        "run",
        "--config",
        missing.to_str().unwrap(),
        "--nbd-unix",
        &s,
    ]);
    assert_mentions(&stderr, &["nope.toml"], "missing config file");
    let stderr = tandemd_must_refuse(&["run", "--export", "vol=/x", "--nbd-tcp", "not-an-address"]);
    assert_mentions(&stderr, &["--nbd-tcp", "not-an-address"], "bad --nbd-tcp");
    let stderr = tandemd_must_refuse(&["run", "--export", "novalue", "--nbd-unix", &s]);
    assert_mentions(&stderr, &["--export", "novalue"], "bad --export");
    let stderr = tandemd_must_refuse(&["run", "--export", "vol=/x"]);
    assert_mentions(&stderr, &["listener"], "no listener");
}

#[test]
fn blank_backing_is_refused_pointing_to_tandemctl_create() {
    let d = Daemon::builder().prepare();
    let blank = d.dir().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(VOL).unwrap();
    let sock = d.dir().join("s.sock").display().to_string();
    let admin = d.dir().join("a.sock").display().to_string();
    let spec = format!("blank={}", blank.display());
    let stderr = tandemd_must_refuse(&[
        "run",
        "--export",
        &spec,
        "--nbd-unix",
        &sock,
        "--admin-socket",
        &admin,
    ]);
    assert_mentions(
        &stderr,
        &[blank.to_str().unwrap(), "tandemctl create"],
        "blank backing",
    );
    // Nothing was written to it.
    assert!(
        read_file_at(&blank, 0, 8192).iter().all(|&b| b == 0),
        "tandemd wrote to a blank backing"
    );
    // A backing file that does not exist at all.
    let spec = format!("gone={}", d.dir().join("gone.img").display());
    let stderr = tandemd_must_refuse(&[
        "run",
        "--export",
        &spec,
        "--nbd-unix",
        &sock,
        "--admin-socket",
        &admin,
    ]);
    assert_mentions(&stderr, &["gone.img"], "missing backing");
    assert!(
        !d.dir().join("gone.img").exists(),
        "tandemd created a missing backing file"
    );
}

#[test]
fn backing_of_another_volume_is_refused() {
    let export = |extra: &str| {
        format!(
            "[[export]]\nname = \"vol\"\nbacking = \"{{dir}}/vol.img\"\nengine = \"sync\"\n{extra}"
        )
    };
    // Wrong volume name.
    let (d, _) = with_config(&export("volume = \"other\"\n"));
    let stderr = d.must_refuse();
    assert_mentions(
        &stderr,
        &["vol.img", "\"other\"", "\"vol\""],
        "volume name mismatch",
    );
    // Wrong UUID.
    let (d, _) = with_config(&export(&format!("uuid = \"{UUID_B}\"\n")));
    let stderr = d.must_refuse();
    assert_mentions(&stderr, &["vol.img", UUID_B, UUID_A], "uuid mismatch");
    // Right name, wrong UUID: still refused.
    let (d, _) = with_config(&export(&format!("volume = \"vol\"\nuuid = \"{UUID_B}\"\n")));
    let stderr = d.must_refuse();
    assert_mentions(&stderr, &[UUID_B], "name ok, uuid mismatch");
    // Control: the matching identity is served.
    let (mut d, _) = with_config(&export(&format!("volume = \"vol\"\nuuid = \"{UUID_A}\"\n")));
    d.start();
    assert_eq!(d.export_status("vol")["uuid"], UUID_A);
    d.stop();
}

fn flip_byte(path: &Path, offset: u64) {
    let b = read_file_at(path, offset, 1)[0];
    write_file_at(path, offset, &[b ^ 0xff]);
}

#[test]
fn both_superblock_copies_corrupt_is_refused() {
    let d = Daemon::builder().volume("vol", VOL).prepare();
    let backing = d.backing("vol").to_path_buf();
    flip_byte(&backing, 300); // inside copy A, past its magic
    flip_byte(&backing, 4096 + 300); // copy B
    let stderr = d.must_refuse();
    assert_mentions(&stderr, &["vol.img", "checksum"], "both copies corrupt");
}

#[test]
fn truncated_backing_is_refused() {
    let d = Daemon::builder().volume("vol", VOL).prepare();
    let backing = d.backing("vol").to_path_buf();
    let len = std::fs::metadata(&backing).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let stderr = d.must_refuse();
    assert_mentions(
        &stderr,
        &["vol.img", &format!("{}", len / 2)],
        "truncated backing",
    );
}

#[test]
fn one_damaged_superblock_copy_is_repaired_and_served() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let backing = d.backing("vol").to_path_buf();
    let data = Rng::new(3).bytes(1 << 20);
    block_on(async {
        let mut c = d.client("vol").await;
        c.write(4 << 20, &data, true).await.expect("write");
        c.disconnect().await.expect("disconnect");
    });
    d.stop();
    let good = read_file_at(&backing, 0, 4096);

    // Copy A: checksum damage. Copy B: wiped to zeroes. One at a time.
    for (label, damage) in [("A", 0u64), ("B", 1)] {
        if damage == 0 {
            flip_byte(&backing, 300);
        } else {
            write_file_at(&backing, 4096, &[0u8; 4096]);
        }
        let before = inspect(&backing);
        assert!(
            before["other_copy_error"].is_string(),
            "inspect does not report damaged copy {label}: {before}"
        );
        d.start();
        let log = d.log();
        assert!(
            log.contains("superblock copy damaged")
                && (log.contains(&format!("copy=\"{label}\""))
                    || log.contains(&format!("copy={label}"))),
            "no log line about repairing copy {label}:\n{log}"
        );
        block_on(async {
            let mut c = d.client("vol").await;
            let mut back = vec![0u8; data.len()];
            c.read(4 << 20, &mut back).await.expect("read");
            assert!(
                back == data,
                "data differs after opening with damaged copy {label}"
            );
            c.disconnect().await.expect("disconnect");
        });
        d.stop();
        let after = inspect(&backing);
        assert!(
            after["other_copy_error"].is_null(),
            "copy {label} not repaired: tandemctl inspect --json says {after}"
        );
        assert_eq!(after["uuid"], before["uuid"]);
        let a = read_file_at(&backing, 0, 4096);
        let b = read_file_at(&backing, 4096, 4096);
        assert!(
            a == good && b == good,
            "repaired copies differ from the original superblock"
        );
    }
}

#[test]
fn read_only_export_refuses_writes_and_leaves_the_backing_untouched() {
    let (mut d, _) =
        with_config("[[export]]\nname = \"vol\"\nbacking = \"{dir}/vol.img\"\nread_only = true\n");
    let backing = d.backing("vol").to_path_buf();
    let before = std::fs::read(&backing).expect("read backing");
    d.start();
    assert_eq!(d.export_status("vol")["read_only"], true);
    let mut c = d.raw();
    let (_, flags) = c.handshake("vol");
    assert!(
        flags & tandem_core::nbd::tflag::READ_ONLY != 0,
        "READ_ONLY flag not advertised"
    );
    const EPERM: u32 = 1;
    let data = vec![0xa5u8; 4096];
    assert_eq!(
        c.call(1, 0, 0, 4096, &data).0,
        EPERM,
        "WRITE on a read-only export"
    );
    assert_eq!(
        c.call(4, 0, 0, 4096, &[]).0,
        EPERM,
        "TRIM on a read-only export"
    );
    assert_eq!(
        c.call(6, 0, 0, 4096, &[]).0,
        EPERM,
        "WRITE_ZEROES on a read-only export"
    );
    let (e, back) = c.call(0, 0, 0, 4096, &[]);
    assert_eq!(e, 0, "READ on a read-only export");
    assert!(back.iter().all(|&b| b == 0), "fresh volume reads zeroes");
    assert_eq!(c.call(3, 0, 0, 0, &[]).0, 0, "FLUSH on a read-only export");
    drop(c);
    d.stop();
    let after = std::fs::read(&backing).expect("read backing");
    assert!(
        before == after,
        "a read-only export modified its backing file"
    );
}
