//! The test model is where every test and binary looks for it.
use std::io::Read;

#[test]
fn test_model_is_located_and_readable() {
    let path = flowtune_lm::locate_test_model().unwrap_or_else(|e| panic!("{e}"));
    if path.is_dir() {
        assert!(
            path.join("config.json").is_file(),
            "{}: no config.json",
            path.display()
        );
        return;
    }
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&magic, b"GGUF", "{} is not a GGUF file", path.display());
}
