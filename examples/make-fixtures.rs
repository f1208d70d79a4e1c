//! Regenerate the files under fixtures/ (deterministic: the same bytes every run).
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fixtures".into()));
    if let Err(e) = lorascope::fixtures::write_all(&dir) {
        eprintln!("make-fixtures: {e}");
        std::process::exit(2);
    }
    println!("fixtures written to {}", dir.display());
}
