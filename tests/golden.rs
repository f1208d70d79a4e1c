//! Byte-identity guard: the `--json` output of every command on every fixture (and the README's
//! demo report) must not change unless a change is deliberate. tests/golden/commands.txt lists
//! the commands; `LORASCOPE_BLESS=1 cargo test --test golden` rewrites the expected files, and
//! the commit that does so must say which fields changed and why.

use std::path::Path;
use std::process::Command;

#[test]
fn json_outputs_are_byte_identical_to_the_recorded_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/golden");
    let list = std::fs::read_to_string(dir.join("commands.txt")).expect("commands.txt");
    let bless = std::env::var_os("LORASCOPE_BLESS").is_some();
    let mut differ = vec![];
    for line in list.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let (file, args) = line.split_once('\t').expect("OUTPUT<TAB>ARGS");
        let out = Command::new(env!("CARGO_BIN_EXE_lorascope"))
            .args(args.split_whitespace())
            .current_dir(root)
            .output()
            .expect("run lorascope");
        assert!(out.status.success(), "{args}: exit {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        let expected = dir.join(file);
        if bless {
            std::fs::write(&expected, &out.stdout).expect("write golden file");
            continue;
        }
        let want = std::fs::read(&expected).unwrap_or_else(|e| panic!("{}: {e}", expected.display()));
        if want != out.stdout {
            let (w, g) = (String::from_utf8_lossy(&want), String::from_utf8_lossy(&out.stdout));
            let first =
                w.lines().zip(g.lines()).position(|(a, b)| a != b).unwrap_or(w.lines().count().min(g.lines().count()));
            differ.push(format!(
                "{file} ({args}): first difference at line {}:\n  want {:?}\n  got  {:?}",
                first + 1,
                w.lines().nth(first).unwrap_or(""),
                g.lines().nth(first).unwrap_or("")
            ));
        }
    }
    assert!(differ.is_empty(), "outputs changed:\n{}", differ.join("\n"));
}
