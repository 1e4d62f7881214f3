//! `include/fusedopt.h` is what cbindgen makes of `src/lib.rs` today. With `FUSEDOPT_BLESS=1`
//! the test rewrites the header instead.

use std::path::Path;

#[test]
fn the_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8");
    let path = dir.join("include/fusedopt.h");
    if std::env::var_os("FUSEDOPT_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/fusedopt.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "capi/include/fusedopt.h is out of date with capi/src/lib.rs: run \
         `FUSEDOPT_BLESS=1 cargo test -p fusedopt-capi --test header` and commit the result"
    );
}
