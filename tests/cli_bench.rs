//! `sepconv bench` end to end: its options and what it reports (not its timings).

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sepconv"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sepconv-cli-bench-{name}-{}", std::process::id()))
}

/// A quick `sepconv bench`: one timed repetition, no peak measurements, two threads.
const QUICK: [&str; 8] = [
    "bench",
    "--reps",
    "1",
    "--warmup",
    "0",
    "--no-peak",
    "--threads",
    "2",
];

/// The JSON rows of a quick run with `args`.
fn bench_rows(name: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let json = temp_path(name);
    let path = json.to_string_lossy().into_owned();
    let mut all = QUICK.to_vec();
    all.extend(args);
    all.extend(["--json", &path]);
    let o = run(&all);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    rows.as_array().unwrap().clone()
}

/// Depthwise forward on layers A and D.
const DW_FORWARD: [&str; 6] = ["--layers", "A,D", "--variants", "dw", "--passes", "forward"];

#[test]
fn batch_sets_the_images_of_every_layer() {
    let mut args = DW_FORWARD.to_vec();
    args.extend(["--batch", "3"]);
    let rows = bench_rows("batch", &args);
    assert_eq!(rows.len(), 2);
    // Depthwise 3 × 3: batch · channels · output pixels · 9. Layer A (3 channels, 15 × 15,
    // valid): 13 × 13 outputs; D (512 channels, 14 × 14, same).
    let want = [("A", 3 * 3 * 13 * 13 * 9), ("D", 3 * 512 * 14 * 14 * 9)];
    for (row, (layer, macs)) in rows.iter().zip(want) {
        assert_eq!(row["layer"], layer);
        assert_eq!(row["batch"], 3);
        assert_eq!(row["macs"], macs, "{layer}");
    }
}

#[test]
fn the_reference_batches_without_batch() {
    let rows = bench_rows("reference", &DW_FORWARD);
    let batches: Vec<u64> = rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 8]);
}

/// Each row keeps the runs of every round: three rounds of at least one run (more where a
/// run is shorter than the sampling target) give at least three, and the Markdown says so.
#[test]
fn rounds_keep_the_runs_of_every_round() {
    let one = bench_rows("one-round", &DW_FORWARD);
    let mut args = DW_FORWARD.to_vec();
    args.extend(["--rounds", "3"]);
    let three = bench_rows("three-rounds", &args);
    assert_eq!(three.len(), one.len());
    for row in &three {
        let reps = row["reps"].as_u64().unwrap();
        assert!(reps >= 3, "{row}");
        assert!(row["min_ms"].as_f64().unwrap() <= row["median_ms"].as_f64().unwrap());
    }
    let md = temp_path("rounds.md");
    let path = md.to_string_lossy().into_owned();
    let mut args = QUICK.to_vec();
    args.extend(["--layers", "A", "--variants", "dw", "--passes", "forward"]);
    args.extend(["--rounds", "2", "--markdown", &path]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    assert!(text.contains("`sepconv bench --rounds 2`"), "{text}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("round 2 of 2: timing A"));
}

#[test]
fn bad_options_are_one_line_errors_with_status_2() {
    for (args, names) in [
        (vec!["bench", "--batch", "0"], "--batch"),
        (vec!["bench", "--reps", "0"], "--reps"),
        (vec!["bench", "--rounds", "0"], "--rounds"),
        (vec!["bench", "--layers", "Q"], "'Q'"),
        (
            vec!["bench", "--compare-torch", "--python", "/no/such/python"],
            "/no/such/python",
        ),
        (
            vec!["bench", "--markdown", "t.md", "--markdown-section", "a b"],
            "--markdown-section 'a b'",
        ),
        (
            vec!["bench", "--markdown", "/no/such/folder/t.md"],
            "--markdown /no/such/folder/t.md: no such folder /no/such/folder",
        ),
        (
            vec!["bench", "--json", "/no/such/folder/t.json"],
            "--json /no/such/folder/t.json: no such folder /no/such/folder",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(names), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn markdown_replaces_only_its_batch_between_the_markers() {
    let md = temp_path("table.md");
    let before = "# Title\n<!-- bench:start -->\nreference table\n<!-- bench:end -->\n\
                  <!-- bench-batch-2:start -->\nold\n<!-- bench-batch-2:end -->\ntail\n";
    std::fs::write(&md, before).unwrap();
    let path = md.to_string_lossy().into_owned();
    let mut args = QUICK.to_vec();
    args.extend(["--layers", "A", "--variants", "dw", "--passes", "forward"]);
    args.extend(["--batch", "2", "--markdown", &path]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    assert!(after.starts_with("# Title\n<!-- bench:start -->\nreference table\n"));
    assert!(
        after.ends_with("<!-- bench-batch-2:end -->\ntail\n"),
        "{after}"
    );
    assert!(!after.contains("\nold\n"), "{after}");
    assert!(after.contains("`sepconv bench --batch 2`"), "{after}");
    assert!(after.contains("| A | dw | forward | 9126 |"), "{after}");
}

/// A quick one-row run with `--markdown` into a temporary file `name` that holds `before`:
/// the run's output, the file's path and its text afterwards (the file removed).
fn markdown_run_on(name: &str, before: &str) -> (std::process::Output, String, String) {
    let md = temp_path(name);
    std::fs::write(&md, before).unwrap();
    let path = md.to_string_lossy().into_owned();
    let mut args = QUICK.to_vec();
    args.extend(["--layers", "A", "--variants", "dw", "--passes", "forward"]);
    args.extend(["--markdown", &path]);
    let o = run(&args);
    let after = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    (o, path, after)
}

/// An existing file without the section's markers is not overwritten: the run stops before
/// benchmarking anything, with a one-line error naming the file and the markers it needs.
#[test]
fn markdown_into_a_file_without_its_markers_is_refused_before_the_runs() {
    let before =
        "# Notes\nkeep this\n<!-- bench-batch-2:start -->\nx\n<!-- bench-batch-2:end -->\n";
    let (o, path, after) = markdown_run_on("no-markers.md", before);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&path) && err.contains("<!-- bench:start -->"),
        "{err}"
    );
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(after, before);
}

/// A new file gets the table between its section's markers (named by --markdown-section), so
/// a second run replaces that table and leaves another section of the file as it was.
#[test]
fn markdown_sections_are_named_and_a_new_file_gets_markers() {
    let md = temp_path("sections.md");
    let _ = std::fs::remove_file(&md);
    let path = md.to_string_lossy().into_owned();
    let mut args = QUICK.to_vec();
    args.extend(["--layers", "A", "--variants", "dw", "--passes", "forward"]);
    args.extend(["--markdown", &path, "--markdown-section", "other_machine-2"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = std::fs::read_to_string(&md).unwrap();
    assert!(first.starts_with("<!-- other_machine-2:start -->\nMeasured by `sepconv bench"));
    assert!(first.ends_with("<!-- other_machine-2:end -->\n"), "{first}");
    let kept = "\n<!-- bench:start -->\nthis machine's table\n<!-- bench:end -->\n";
    std::fs::write(&md, format!("{first}{kept}")).unwrap();
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    assert!(second.ends_with(kept), "{second}");
    assert_eq!(second.matches("| layer | variant |").count(), 1, "{second}");
    assert!(second.contains("| A | dw | forward |"), "{second}");
}

/// The markers count only on lines of their own: a file whose prose quotes them before the
/// section (as the README's command table does) keeps that prose, and the table goes between
/// the marker lines.
#[test]
fn markdown_markers_quoted_in_prose_are_not_the_section() {
    let prose = "Writes between `<!-- bench:start -->` and `<!-- bench:end -->`.\n";
    let before = format!("{prose}\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n");
    let (o, _, after) = markdown_run_on("quoted.md", &before);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        after.starts_with(&format!("{prose}\n<!-- bench:start -->\nMeasured by")),
        "{after}"
    );
    assert!(after.ends_with("\n<!-- bench:end -->\nafter\n"), "{after}");
    assert!(
        !after.contains("old table") && after.contains("| A | dw | forward |"),
        "{after}"
    );

    // Quoted markers alone are no section: refused before the run, the file untouched.
    let (o, _, kept) = markdown_run_on("quoted.md", prose);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(kept, prose);
}

/// The depthwise-separable rows say whether they ran fused and, where they did, the same pass's
/// time as two layers (the fusion's gain, printed and in the Markdown); the other variants
/// carry neither.
#[test]
fn ds_rows_report_the_fusion_against_two_layers() {
    let md = temp_path("fusion.md");
    let md_path = md.to_string_lossy().into_owned();
    let json = temp_path("fusion.json");
    let json_path = json.to_string_lossy().into_owned();
    let mut args = QUICK.to_vec();
    args.extend(["--layers", "A", "--variants", "ds", "--markdown", &md_path]);
    args.extend(["--json", &json_path]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let text = std::fs::read_to_string(&md).unwrap();
    let _ = (std::fs::remove_file(&json), std::fs::remove_file(&md));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let rows = rows.as_array().unwrap();
    // std runs too, for the speedup; it fuses nothing.
    assert_eq!(rows.len(), 4);
    for row in rows {
        let (variant, pass) = (
            row["variant"].as_str().unwrap(),
            row["pass"].as_str().unwrap(),
        );
        if variant != "ds" {
            assert!(
                row["fused"].is_null() && row["unfused_min_ms"].is_null(),
                "{row}"
            );
            continue;
        }
        // Inference always runs fused; training where the fused training kernels apply.
        let fused = row["fused"].as_bool().unwrap();
        assert!(fused || pass == "train", "{row}");
        let line = format!("A ds {pass}: ");
        if fused {
            assert!(row["unfused_min_ms"].as_f64().unwrap() > 0.0, "{row}");
            assert!(stdout.contains(&format!("{line}fused ")), "{stdout}");
            assert!(text.contains(&format!("A {pass} ")), "{text}");
        } else {
            assert!(row["unfused_min_ms"].is_null(), "{row}");
            assert!(stdout.contains(&format!("{line}not fused")), "{stdout}");
        }
    }
    assert!(
        text.contains("fused against the same pass as two layers"),
        "{text}"
    );
}

/// A stand-in for PyTorch's peer script: `python -c ...` (the import probe) succeeds, and a run
/// writes the given results where `--json` says, in the script's format.
#[cfg(unix)]
fn fake_python(name: &str, results: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = temp_path(name);
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = -c ] && exit 0\n\
         while [ $# -gt 0 ]; do [ \"$1\" = --json ] && out=\"$2\"; shift; done\n\
         printf '%s' '{{\"meta\": {{\"torch\": \"0.0-fake\"}}, \"results\": {results}}}' > \"$out\"\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs `sepconv bench` (one rep, no warmup, 2 threads, the dw variant, then `extra`) against
/// a fake peer script that reports `results`; returns its stdout and its `--json` rows, both
/// files removed. The run must succeed.
#[cfg(unix)]
fn bench_against_fake_torch(
    name: &str,
    results: &str,
    extra: &[&str],
) -> (String, serde_json::Value) {
    let python = fake_python(&format!("python-{name}"), results);
    let json = temp_path(&format!("{name}.json"));
    let (python_arg, json_arg) = (python.to_string_lossy(), json.to_string_lossy());
    let mut args = vec![
        "bench",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--variants",
        "dw",
        "--compare-torch",
        "--python",
        &python_arg,
        "--json",
        &json_arg,
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    let _ = std::fs::remove_file(&python);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (String::from_utf8_lossy(&o.stdout).into_owned(), rows)
}

/// Each row's target is max(f × PyTorch, MACs at 85% of the measured peak), and the report says
/// which of the two set it: a slow peer leaves the factor (0.9 forward for dw), a peer faster
/// than the machine could be leaves the floor.
#[cfg(unix)]
#[test]
fn targets_say_whether_pytorch_or_the_peak_set_them() {
    let (stdout, rows) = bench_against_fake_torch(
        "targets",
        r#"[{"config": "D", "variant": "dw", "mode": "fwd", "min_ms": 1000.0},
            {"config": "A", "variant": "dw", "mode": "fwd_cl", "min_ms": 0.000001}]"#,
        &["--layers", "A,D", "--passes", "forward"],
    );
    let row = |layer: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["layer"] == layer)
            .unwrap()
            .clone()
    };
    let (d, a) = (row("D"), row("A"));
    assert_eq!(d["torch_min_ms"].as_f64(), Some(1000.0), "{d}");
    assert!(
        (d["target_ms"].as_f64().unwrap() - 900.0).abs() < 1e-9,
        "{d}"
    );
    assert_eq!(d["target_by"], "0.9 × PyTorch", "{d}");
    let macs = a["macs"].as_f64().unwrap();
    let target = a["target_ms"].as_f64().unwrap();
    assert!(target > 0.000001, "{a}");
    assert_eq!(a["target_by"], "85% of peak", "{a}");
    // The floor is the MACs at 85% of the higher of the peak's two measurements (the second is
    // printed only where it is higher), which the run prints to one decimal.
    let peak = stdout
        .lines()
        .filter(|l| l.starts_with("FMA peak"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|&w| w == "GMAC/s")?;
            words.get(at.checked_sub(1)?)?.parse::<f64>().ok()
        })
        .fold(0.0, f64::max);
    let floor = macs / (0.85 * peak * 1e9) * 1e3;
    assert!(
        (target - floor).abs() <= 1e-3 * floor,
        "{a}: target {target}, floor at {peak} GMAC/s {floor}"
    );
    assert!(stdout.contains("0.9 × PyTorch"), "{stdout}");
    assert!(stdout.contains("85% of peak"), "{stdout}");
    assert!(stdout.contains("of 2 targets met"), "{stdout}");
}

/// PyTorch's time for a row is the faster of its two memory formats, in both passes: its
/// channels_last depthwise and pointwise layers run many times faster than NCHW, and the
/// targets are against its best layout.
#[cfg(unix)]
#[test]
fn pytorch_time_is_its_faster_memory_format_in_both_passes() {
    let (_, rows) = bench_against_fake_torch(
        "layouts",
        r#"[{"config": "D", "variant": "dw", "mode": "fwd", "min_ms": 1000.0},
            {"config": "D", "variant": "dw", "mode": "fwd_cl", "min_ms": 500.0},
            {"config": "D", "variant": "dw", "mode": "train", "min_ms": 3000.0},
            {"config": "D", "variant": "dw", "mode": "train_cl", "min_ms": 40.0}]"#,
        &["--layers", "D", "--no-peak"],
    );
    let torch = |pass: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["layer"] == "D" && r["pass"] == pass)
            .and_then(|r| r["torch_min_ms"].as_f64())
    };
    assert_eq!(torch("forward"), Some(500.0), "{rows}");
    assert_eq!(torch("train"), Some(40.0), "{rows}");
}
