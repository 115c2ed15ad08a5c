//! `tunekit convert` end to end: real corpora in each format, bad input with reasons, and the
//! accounting (read = written + rejected).

mod common;

use common::{read_jsonl, stdout_json, tunekit};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

fn convert(dir: &Path, args: &[&str]) -> (std::process::Output, Value) {
    let mut a = vec!["--json", "convert"];
    a.extend_from_slice(args);
    let out = tunekit(&a, dir);
    let v = if out.status.success() { stdout_json(&out) } else { Value::Null };
    (out, v)
}

fn assert_balanced(s: &Value) {
    assert_eq!(
        s["rows_read"].as_u64().unwrap(),
        s["rows_kept"].as_u64().unwrap() + s["rejected"].as_u64().unwrap(),
        "{s}"
    );
    let by: u64 = s["rejected_by_reason"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(by, s["rejected"].as_u64().unwrap());
}

#[test]
fn alpaca_en_demo_converts_every_row() {
    let Some(src) = common::asset("llamafactory-0.9.5/data/alpaca_en_demo.json") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (out, s) = convert(dir.path(), &[src.to_str().unwrap(), "--out", "c.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["formats"].as_object().unwrap().values().next().unwrap(), "alpaca");
    assert_eq!(s["rows_read"], 999);
    assert_balanced(&s);
    let rows = read_jsonl(&dir.path().join("c.jsonl"));
    assert_eq!(rows.len() as u64, s["rows_kept"].as_u64().unwrap());
    let raw: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    // Row 1 maps to user = instruction (+ "\n" + input), assistant = output; the id traces back.
    let first = &rows[0];
    assert_eq!(first["messages"][0]["content"], raw[0]["instruction"]);
    assert_eq!(first["messages"][1]["content"], raw[0]["output"]);
    assert!(first["id"].as_str().unwrap().ends_with("alpaca_en_demo.json:1"));
    let with_input = raw.iter().position(|r| !r["input"].as_str().unwrap().is_empty()).unwrap();
    let conv = rows.iter().find(|r| r["id"].as_str().unwrap().ends_with(&format!(":{}", with_input + 1))).unwrap();
    assert_eq!(
        conv["messages"][0]["content"].as_str().unwrap(),
        format!("{}\n{}", raw[with_input]["instruction"].as_str().unwrap(), raw[with_input]["input"].as_str().unwrap())
    );
}

#[test]
fn v1_sft_demo_messages_with_content_parts_and_loss_weights() {
    let Some(src) = common::asset("llamafactory-0.9.5/data/v1_sft_demo.jsonl") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (out, s) = convert(dir.path(), &[src.to_str().unwrap(), "--out", "c.parquet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 500);
    assert_eq!(s["rows_kept"], 500);
    // Parquet round trip: converting the table again gives the same conversations as JSONL.
    let (out2, s2) = convert(dir.path(), &["c.parquet", "--out", "back.jsonl"]);
    assert!(out2.status.success(), "{}", String::from_utf8_lossy(&out2.stderr));
    assert_eq!(s2["rows_kept"], 500);
    let back = read_jsonl(&dir.path().join("back.jsonl"));
    let (_, _) = convert(dir.path(), &[src.to_str().unwrap(), "--out", "direct.jsonl"]);
    let direct = read_jsonl(&dir.path().join("direct.jsonl"));
    assert_eq!(back, direct);
    assert_eq!(direct[0]["messages"][0]["content"], "hi");
    assert_eq!(direct[0]["messages"][1]["weight"], 1);
}

#[test]
fn csv_with_custom_columns_through_a_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.csv"),
        "lang,text,translation\nFrench,Good morning,Bonjour\nGerman,Thank you,Danke\nSpanish,,Hola\nItalian,Goodbye\n",
    )
    .unwrap();
    let (out, s) = convert(
        dir.path(),
        &[
            "t.csv",
            "--out",
            "o.jsonl",
            "--prompt",
            "Translate into {{ lang }}: {{ text }}",
            "--completion",
            "{{ translation }}",
            "--system",
            "You translate.",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 4);
    assert_eq!(s["rows_kept"], 2);
    assert_eq!(s["rejected_by_reason"]["empty_field"], 1);
    assert_eq!(s["rejected_by_reason"]["wrong_field_count"], 1);
    let rows = read_jsonl(&dir.path().join("o.jsonl"));
    assert_eq!(rows[0]["messages"][0]["content"], "You translate.");
    assert_eq!(rows[0]["messages"][1]["content"], "Translate into French: Good morning");
    assert_eq!(rows[0]["messages"][2]["content"], "Bonjour");
    let rejects = read_jsonl(&dir.path().join("rejects.jsonl"));
    assert_eq!(rejects[0]["row"], 3);
    assert_eq!(rejects[0]["field"], "text");
    assert_eq!(rejects[1]["line"], 5);
}

#[test]
fn builtin_prompt_template_and_bundled_sample() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::root();
    let (out, s) = convert(
        dir.path(),
        &[
            root.join("datasets/countries.csv").to_str().unwrap(),
            "--out",
            "o.jsonl",
            "--prompt-template",
            root.join("datasets/countries.jinja").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 33);
    assert_balanced(&s);
    std::fs::write(
        dir.path().join("qa.jsonl"),
        "{\"question\": \"Why is the sky blue?\", \"answer\": \"Rayleigh scattering.\"}\n",
    )
    .unwrap();
    let (out, _) = convert(dir.path(), &["qa.jsonl", "--out", "qa_out.jsonl", "--prompt-template", "question-answer"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = read_jsonl(&dir.path().join("qa_out.jsonl"));
    assert_eq!(rows[0]["messages"][0]["role"], "system");
    assert_eq!(rows[0]["messages"][1]["content"], "Question: Why is the sky blue?");
}

#[test]
fn bad_rows_get_reasons_and_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("bad.jsonl")).unwrap();
    f.write_all(b"{\"instruction\": \"ok\", \"output\": \"fine\"}\n").unwrap();
    f.write_all(b"{\"instruction\": \"broken\", \"output\": \n").unwrap(); // broken JSON
    f.write_all(b"{\"instruction\": \"bad \xff utf8\", \"output\": \"x\"}\n").unwrap(); // invalid UTF-8
    f.write_all(b"{\"instruction\": \"no answer\"}\n").unwrap(); // missing column
    f.write_all(b"{\"instruction\": \"   \", \"output\": \"empty prompt\"}\n").unwrap(); // empty
    f.write_all(b"{\"instruction\": \"number\", \"output\": 42}\n").unwrap(); // stringified
    f.write_all(b"{\"instruction\": \"list\", \"output\": [1, 2]}\n").unwrap(); // wrong type
    f.write_all(b"[1, 2, 3]\n").unwrap(); // not an object
    f.write_all(b"\n").unwrap(); // blank lines are not rows
    drop(f);
    let (out, s) = convert(dir.path(), &["bad.jsonl", "--out", "o.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 8);
    assert_eq!(s["rows_kept"], 2);
    assert_balanced(&s);
    let by = &s["rejected_by_reason"];
    for (reason, n) in [
        ("invalid_json", 1),
        ("invalid_utf8", 1),
        ("missing_field", 1),
        ("empty_field", 1),
        ("wrong_type", 1),
        ("not_an_object", 1),
    ] {
        assert_eq!(by[reason], n, "{reason}: {by}");
    }
    let rejects = read_jsonl(&dir.path().join("rejects.jsonl"));
    let lines: Vec<u64> = rejects.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 7, 8]);
    assert!(rejects.iter().all(|r| r["source"] == "bad.jsonl"));
    let kept = read_jsonl(&dir.path().join("o.jsonl"));
    assert_eq!(kept[1]["messages"][1]["content"], "42");

    // --strict: the first bad row is an error that names it; no output file appears.
    let (out, _) = convert(dir.path(), &["bad.jsonl", "--out", "strict.jsonl", "--strict"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl row 2 (line 2)") && err.contains("invalid_json"), "{err}");
    assert!(!dir.path().join("strict.jsonl").exists());
}

#[test]
fn malformed_csv_unbalanced_quote_and_template_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("q.csv"), "a,b\n1,ok\n2,\"never closed\n3,lost\n").unwrap();
    let (out, s) =
        convert(dir.path(), &["q.csv", "--out", "o.jsonl", "--prompt", "{{ a }}", "--completion", "{{ b }}"]);
    assert!(out.status.success());
    assert_eq!(s["rows_read"], 2);
    assert_eq!(s["rejected_by_reason"]["malformed_csv"], 1);
    // A template naming a column the file lacks: every row rejected with the column named; a run
    // that keeps nothing exits 1 and says why, with the most common reasons and an example of each.
    let (out, _) =
        convert(dir.path(), &["q.csv", "--out", "o2.jsonl", "--prompt", "{{ a }} {{ c }}", "--completion", "{{ b }}"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("convert kept none of the 2 row(s) read: 2 rejected"), "{err}");
    assert!(err.contains("template_error: 1 (e.g. q.csv row 1") && err.contains("malformed_csv: 1"), "{err}");
    assert!(err.contains("rejects.jsonl"), "{err}");
    let r = read_jsonl(&dir.path().join("rejects.jsonl"));
    assert!(r[0]["detail"].as_str().unwrap().contains("'c'"), "{}", r[0]);
    // A template that fails to render (a filter on the wrong type).
    let (out, _) = convert(
        dir.path(),
        &["q.csv", "--out", "o3.jsonl", "--prompt", "{{ a | batch(0) }}", "--completion", "{{ b }}"],
    );
    assert_eq!(out.status.code(), Some(1));
    let r = read_jsonl(&dir.path().join("rejects.jsonl"));
    assert_eq!(r.iter().filter(|x| x["reason"] == "template_error").count(), 1, "{r:?}");
}

#[test]
fn errors_for_files_and_formats_have_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let err = convert_error(dir.path(), "x.csv", "foo,bar\n1,2\n");
    assert!(err.contains("[foo, bar]") && err.contains("alpaca: instruction + output"), "{err}");
    let (out, _) = convert(dir.path(), &["missing.jsonl", "--out", "o.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"));
    std::fs::write(dir.path().join("x.xml"), "<a/>").unwrap();
    let (out, _) = convert(dir.path(), &["x.xml", "--out", "o.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown file type"));
    let (out, _) = convert(dir.path(), &["x.csv"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let (out, _) = convert(dir.path(), &["x.csv", "--out", "o.jsonl", "--format", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    // An evaluation set that cannot be read is a data error, named with its flag.
    let (out, _) = convert(dir.path(), &["x.csv", "--out", "o.jsonl", "--decontaminate", "gone.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--decontaminate gone.jsonl"));
}

#[test]
fn compressed_inputs_sharegpt_preference_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let line =
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"hello\"}]}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(line.repeat(3).as_bytes()).unwrap();
    std::fs::write(dir.path().join("s.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.path().join("s2.jsonl.zst"), zstd::encode_all(line.as_bytes(), 3).unwrap()).unwrap();
    let (out, s) = convert(dir.path(), &["s.jsonl.gz", "s2.jsonl.zst", "--out", "o.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_kept"], 4);
    let rows = read_jsonl(&dir.path().join("o.jsonl"));
    assert_eq!(rows[0]["messages"][1]["role"], "assistant");

    std::fs::write(
        dir.path().join("hh.jsonl"),
        "{\"chosen\": \"\\n\\nHuman: Is water wet?\\n\\nAssistant: Yes, in the everyday sense.\", \"rejected\": \"\\n\\nHuman: Is water wet?\\n\\nAssistant: No.\"}\n",
    )
    .unwrap();
    let (out, s) = convert(dir.path(), &["hh.jsonl", "--out", "p.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["formats"].as_object().unwrap().values().next().unwrap(), "preference");
    let p = read_jsonl(&dir.path().join("p.jsonl"));
    assert_eq!(p[0]["messages"][0]["content"], "Is water wet?");
    assert_eq!(p[0]["chosen"]["content"], "Yes, in the everyday sense.");
    assert_eq!(p[0]["rejected"]["content"], "No.");

    std::fs::write(dir.path().join("w.txt"), "First paragraph.\n\nSecond one.\n").unwrap();
    let (out, s) = convert(dir.path(), &["w.txt", "--out", "t.jsonl"]);
    assert!(out.status.success());
    assert_eq!(s["rows_kept"], 2);
}

#[test]
fn llamafactory_preference_and_sharegpt_tool_data() {
    let (Some(dpo), Some(tools)) = (
        common::asset("llamafactory-0.9.5/data/dpo_en_demo.json"),
        common::asset("llamafactory-0.9.5/data/glaive_toolcall_en_demo.json"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (out, s) = convert(dir.path(), &[dpo.to_str().unwrap(), "--out", "d.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 300);
    assert_eq!(s["rows_kept"], 300, "{s}");
    let d = read_jsonl(&dir.path().join("d.jsonl"));
    assert_eq!(d[0]["chosen"]["role"], "assistant");
    let (out, s) = convert(dir.path(), &[tools.to_str().unwrap(), "--out", "t.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_read"], 300);
    assert_balanced(&s);
    let t = read_jsonl(&dir.path().join("t.jsonl"));
    assert!(t.iter().any(|r| r["messages"].as_array().unwrap().iter().any(|m| m.get("tool_calls").is_some())));
    assert!(t[0]["tools"].is_array());
}

/// Rows with accents, a comma and a semicolon inside fields, and a quoted answer over two lines.
const FRENCH: [(&str, &str); 3] = [
    ("Quelle est la capitale de la France ?", "Paris, bien sûr.\nC'est aussi la plus grande ville."),
    ("Combien font 2,5 + 2,5 ?", "5,0"),
    ("Qu'est-ce qu'un café crème ?", "Un café avec de la crème; très apprécié."),
];

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The file as a spreadsheet exports it: `header`, then FRENCH joined by `delim`, CRLF line ends.
fn spreadsheet_text(header: &str, delim: &str) -> String {
    let mut t = format!("{header}\r\n");
    for (q, a) in FRENCH {
        t.push_str(&format!("{}{delim}{}\r\n", quoted(q), quoted(a)));
    }
    t
}

fn assert_french(dir: &Path, out: &str) {
    let kept = read_jsonl(&dir.join(out));
    assert_eq!(kept.len(), 3);
    for (row, (q, a)) in kept.iter().zip(FRENCH) {
        assert_eq!(row["messages"][0]["content"], q);
        assert_eq!(row["messages"][1]["content"], a);
    }
}

#[test]
fn excel_semicolon_csv_with_bom_crlf_and_multiline_cells_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("\u{feff}{}", spreadsheet_text("instruction;output", ";"));
    std::fs::write(dir.path().join("excel.csv"), text).unwrap();
    let (out, s) = convert(dir.path(), &["excel.csv", "--out", "o.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_kept"], 3, "{s}");
    assert_eq!(s["formats"]["excel.csv"], "alpaca; delimiter ';'");
    assert_french(dir.path(), "o.jsonl");
    // Forcing the wrong delimiter reads one column, which no format fits: an error, exit 1.
    let (out, _) = convert(dir.path(), &["excel.csv", "--out", "o2.jsonl", "--delimiter", ","]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[instruction;output]"));
    // Rejects name the line as an editor shows it, after CRLF, CR-only and multi-line cells alike.
    for (name, nl) in [("crlf.csv", "\r\n"), ("cr.csv", "\r"), ("lf.csv", "\n")] {
        let text = format!("instruction;output{nl}\"two{nl}lines\";x{nl}q;{nl}r;y{nl}");
        std::fs::write(dir.path().join(name), text).unwrap();
        let (out, s) = convert(dir.path(), &[name, "--out", "g.jsonl"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(s["rows_kept"], 2, "{name}: {s}");
        let r = read_jsonl(&dir.path().join("rejects.jsonl"));
        assert_eq!((r[0]["row"].as_u64(), r[0]["line"].as_u64()), (Some(2), Some(4)), "{name}: {}", r[0]);
    }
    // A pipe file, with its delimiter given; a bad --delimiter is a usage error (exit 2).
    std::fs::write(dir.path().join("p.csv"), spreadsheet_text("instruction|output", "|")).unwrap();
    let (out, s) = convert(dir.path(), &["p.csv", "--out", "p.jsonl", "--delimiter", "|"]);
    assert!(out.status.success());
    assert_eq!(s["rows_kept"], 3);
    let (out, _) = convert(dir.path(), &["p.csv", "--out", "p.jsonl", "--delimiter", "||"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn windows_1252_and_utf16_files_decode_and_question_answer_columns_map() {
    let dir = tempfile::tempdir().unwrap();
    // Windows-1252: every accented character is one byte that is not UTF-8.
    let text = spreadsheet_text("question,answer", ",");
    let (bytes, _, lossy) = encoding_rs::WINDOWS_1252.encode(&text);
    assert!(!lossy);
    std::fs::write(dir.path().join("latin.csv"), &bytes).unwrap();
    // Without --encoding the accented rows are rejected, and the reason says what to do.
    let (out, s) = convert(dir.path(), &["latin.csv", "--out", "o.jsonl"]);
    assert!(out.status.success());
    assert_eq!(s["rejected_by_reason"]["invalid_utf8"], 2, "{s}");
    let r = read_jsonl(&dir.path().join("rejects.jsonl"));
    assert!(r[0]["detail"].as_str().unwrap().contains("--encoding windows-1252"), "{}", r[0]);
    let out = tunekit(&["convert", "latin.csv", "--out", "o.jsonl"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("rejected 2 of 3 rows (more than half)"), "{err}");
    for label in ["windows-1252", "latin-1", "cp1252"] {
        let (out, s) = convert(dir.path(), &["latin.csv", "--out", "l.jsonl", "--encoding", label]);
        assert!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(s["rows_kept"], 3);
        assert_eq!(
            s["formats"]["latin.csv"],
            "prompt-completion (prompt <- question, completion <- answer); encoding windows-1252"
        );
        assert_french(dir.path(), "l.jsonl");
    }
    let (out, _) = convert(dir.path(), &["latin.csv", "--out", "l.jsonl", "--encoding", "klingon"]);
    assert_eq!(out.status.code(), Some(2));
    // UTF-16 LE with its BOM, tab-separated, capitalised Query/Response: found without any flag.
    let text = spreadsheet_text("Query\tResponse", "\t");
    let mut bytes = vec![0xFF, 0xFE];
    bytes.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
    std::fs::write(dir.path().join("u16.csv"), &bytes).unwrap();
    let (out, s) = convert(dir.path(), &["u16.csv", "--out", "u.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        s["formats"]["u16.csv"],
        "prompt-completion (prompt <- Query, completion <- Response); delimiter tab, encoding UTF-16LE"
    );
    assert_french(dir.path(), "u.jsonl");
}

#[test]
fn duplicate_and_unnamed_header_columns_are_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let err = convert_error(dir.path(), "d.csv", "instruction,output,output\na,b,c\n");
    assert!(err.contains("'output' (columns 2 and 3)"), "{err}");
    let err = convert_error(dir.path(), "e.csv", "instruction,,output\na,b,c\n");
    assert!(err.contains("no name for column(s) 2"), "{err}");
}

/// Converts a file with `text` that must fail with exit code 1; its stderr.
fn convert_error(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    let (out, _) = convert(dir, &[name, "--out", "o.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn xlsx_sheets_read_as_the_spreadsheet_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let book = common::root().join("tests/fixtures/spreadsheets/two_sheets.xlsx");
    let b = book.to_str().unwrap();
    let (out, s) = convert(dir.path(), &[b, "--out", "faq.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Five rows of data (the empty row 6 is no row), one without an answer.
    assert_eq!((s["rows_read"].as_u64(), s["rows_kept"].as_u64()), (Some(5), Some(4)), "{s}");
    let kept = read_jsonl(&dir.path().join("faq.jsonl"));
    let answers: Vec<&str> = kept.iter().map(|r| r["messages"][1]["content"].as_str().unwrap()).collect();
    assert_eq!(answers, ["8", "42", "1969-07-20", "TRUE"]);
    assert_eq!(kept[0]["messages"][0]["content"], "Combien de pattes a une araignée ?");
    assert!(kept[0]["id"].as_str().unwrap().ends_with("two_sheets.xlsx:3"), "ids are spreadsheet rows: {}", kept[0]);
    let r = read_jsonl(&dir.path().join("rejects.jsonl"));
    assert_eq!((r[0]["row"].as_u64(), r[0]["reason"].as_str()), (Some(8), Some("missing_field")), "{}", r[0]);
    // The second sheet by name, through a template; a sheet that is not there is named with the others.
    let (out, s) = convert(
        dir.path(),
        &[
            b,
            "--sheet",
            "glossary",
            "--out",
            "g.jsonl",
            "--prompt",
            "What is {{ term }}?",
            "--completion",
            "{{ definition }}",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rows_kept"], 2);
    let (out, _) = convert(dir.path(), &[b, "--sheet", "nope", "--out", "n.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sheet named \"nope\"; its sheets are: faq, glossary"));
}

#[test]
fn sql_filters_and_joins_count_what_they_drop() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = String::from("id,question,lang,score\n");
    let mut a = String::from("id,answer\n");
    for i in 1..=10 {
        let lang = if i % 2 == 0 { "fr" } else { "en" };
        q.push_str(&format!("{i},question {i},{lang},{}\n", i * 10));
        if i != 4 {
            a.push_str(&format!("{i},answer {i}\n"));
        }
    }
    std::fs::write(dir.path().join("questions.csv"), &q).unwrap();
    std::fs::write(dir.path().join("answers.csv"), &a).unwrap();
    // A filter on one file (its table is `data`; numbers compare as numbers): ids stay the file's rows.
    let (out, s) = convert(
        dir.path(),
        &[
            "questions.csv",
            "--out",
            "f.jsonl",
            "--sql",
            "SELECT *, question || '?' AS prompt, 'yes' AS completion FROM data WHERE lang = 'fr' AND score >= 40",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        (s["rows_read"].as_u64(), s["rows_kept"].as_u64(), s["filtered"].as_u64()),
        (Some(10), Some(4), Some(6))
    );
    assert_balanced_with_filtered(&s);
    let kept = read_jsonl(&dir.path().join("f.jsonl"));
    let ids: Vec<&str> = kept.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["questions.csv:4", "questions.csv:6", "questions.csv:8", "questions.csv:10"]);
    assert_eq!(kept[0]["messages"][0]["content"], "question 4?");
    // A join of two files, each a table named by its stem: question 4 has no answer.
    let (out, s) = convert(
        dir.path(),
        &[
            "questions.csv",
            "answers.csv",
            "--out",
            "j.jsonl",
            "--sql",
            "SELECT q.question AS prompt, a.answer AS completion FROM questions q JOIN answers a ON q.id = a.id",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        (s["rows_read"].as_u64(), s["rows_kept"].as_u64(), s["filtered"].as_u64()),
        (Some(19), Some(9), Some(10))
    );
    assert_balanced_with_filtered(&s);
    let kept = read_jsonl(&dir.path().join("j.jsonl"));
    assert!(kept.iter().all(|r| r["messages"][0]["content"] != "question 4"));
    // --limit and a seeded --sample; the same seed draws the same rows.
    let (_, s) = convert(
        dir.path(),
        &["questions.csv", "--out", "l.jsonl", "--limit", "3", "--map", "prompt=question,completion=lang"],
    );
    assert_eq!((s["rows_kept"].as_u64(), s["filtered"].as_u64()), (Some(3), Some(7)), "{s}");
    let sample = |out: &str| {
        let args =
            ["questions.csv", "--out", out, "--sample", "4", "--seed", "3", "--map", "prompt=question,completion=lang"];
        assert!(convert(dir.path(), &args).0.status.success());
        read_jsonl(&dir.path().join(out)).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let (s1, s2) = (sample("s1.jsonl"), sample("s2.jsonl"));
    assert_eq!(s1.len(), 4);
    assert_eq!(s1, s2);
    // A query that does not parse or names no table: exit 1 naming the tables.
    let (out, _) = convert(dir.path(), &["questions.csv", "--out", "x.jsonl", "--sql", "SELECT * FROM nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("its tables are: data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_balanced_with_filtered(s: &Value) {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    assert_eq!(n("rows_read"), n("rows_kept") + n("rejected") + n("filtered"), "{s}");
}

#[test]
fn quality_filters_reject_with_their_reasons_and_the_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        ("What is the capital of France?", "Paris is the capital of France."), // passes every rule
        ("Hi", "Hello there, how can I help you today?"),                      // prompt too short
        ("Name a fruit that is yellow.", "Banana"),                            // answer too short
        ("Tell me a story.", "As an AI language model, I cannot tell stories."), // refusal
        ("Say it again and again.", "again and again and again and again and again and again"), // loop
        ("What is two plus two?", "   "),                                      // empty answer
        ("Was ist die Hauptstadt von Frankreich?", "Paris ist die Hauptstadt von Frankreich."), // German
    ];
    let mut f = std::fs::File::create(dir.path().join("q.jsonl")).unwrap();
    for (p, a) in rows {
        writeln!(f, "{}", serde_json::json!({"prompt": p, "completion": a})).unwrap();
    }
    let (out, s) = convert(
        dir.path(),
        &[
            "q.jsonl",
            "--out",
            "o.jsonl",
            "--min-prompt-words",
            "2",
            "--min-answer-words",
            "2",
            "--refusals",
            "default",
            "--max-repeated-share",
            "0.5",
            "--drop-empty-answers",
            "--language",
            "eng",
            "--min-language-confidence",
            "0.1",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_balanced(&s);
    assert_eq!(s["rows_kept"], 1, "{s}");
    let by = &s["rejected_by_reason"];
    // The whitespace answer is an empty field before any filter sees it.
    for (reason, n) in [
        ("prompt_length", 1),
        ("answer_length", 1),
        ("refusal", 1),
        ("repetitive", 1),
        ("empty_field", 1),
        ("language", 1),
    ] {
        assert_eq!(by[reason], n, "{reason}: {s}");
    }
    let r = read_jsonl(&dir.path().join("rejects.jsonl"));
    let refusal = r.iter().find(|x| x["reason"] == "refusal").unwrap();
    assert_eq!(refusal["row"], 4);
    assert!(refusal["detail"].as_str().unwrap().contains("as an ai language model"), "{refusal}");
    // A bad share is a usage error.
    let (out, _) = convert(dir.path(), &["q.jsonl", "--out", "o.jsonl", "--max-repeated-share", "2"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Evaluation questions planted in a training set, copied or lightly edited (case, punctuation, a
/// word changed near the end, wrapped in more text): each is found, naming its evaluation row, and
/// no other row is.
#[test]
fn decontamination_finds_planted_evaluation_questions_and_nothing_else() {
    let Some(src) = common::asset("llamafactory-0.9.5/data/alpaca_en_demo.json") else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    // The evaluation set: 20 instructions of at least 16 words taken out of the training data.
    let long: Vec<&Value> =
        rows.iter().filter(|r| r["instruction"].as_str().unwrap().split_whitespace().count() >= 16).collect();
    let eval: Vec<&str> = long.iter().take(20).map(|r| r["instruction"].as_str().unwrap()).collect();
    assert_eq!(eval.len(), 20, "the demo data has enough long instructions");
    let mut f = std::fs::File::create(dir.path().join("eval.jsonl")).unwrap();
    for q in &eval {
        writeln!(f, "{}", serde_json::json!({"question": q, "id": "x"})).unwrap();
    }
    // The training set: every demo row whose instruction is not an eval question, then the planted rows.
    let mut train: Vec<Value> =
        rows.iter().filter(|r| !eval.contains(&r["instruction"].as_str().unwrap())).cloned().collect();
    let clean = train.len();
    for (i, q) in eval.iter().enumerate() {
        let edited = match i % 4 {
            0 => q.to_string(),
            1 => q.to_uppercase().replace(',', ""),
            2 => format!("Answer carefully. {q} Explain your reasoning."),
            _ => {
                let mut w: Vec<&str> = q.split_whitespace().collect();
                let last = w.len() - 1;
                w[last] = "something";
                w.join(" ")
            }
        };
        train.push(serde_json::json!({"instruction": edited, "input": "", "output": "planted answer"}));
    }
    std::fs::write(dir.path().join("train.json"), serde_json::to_string(&train).unwrap()).unwrap();
    let (out, s) = convert(dir.path(), &["train.json", "--out", "o.jsonl", "--decontaminate", "eval.jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["contaminated"], 20, "recall and precision 1: {s}");
    assert_eq!(s["rows_kept"].as_u64().unwrap() as usize, clean);
    assert_eq!(s["rows_read"].as_u64().unwrap() as usize, clean + 20, "the counts add up: {s}");
    assert!(!dir.path().join("rejects.jsonl").exists(), "contaminated rows are not rejects");
    let planted = read_jsonl(&dir.path().join("contaminated.jsonl"));
    assert_eq!(planted.len(), 20);
    assert!(planted.iter().all(|x| x["row"].as_u64().unwrap() as usize > clean), "only planted rows");
    assert_eq!((planted[0]["eval_row"].as_str(), planted[0]["side"].as_str()), (Some("eval.jsonl:1"), Some("prompt")));
    assert!(planted[0]["share"].as_f64().unwrap() > 0.5, "{}", planted[0]);
    assert_eq!(
        planted[0]["record"]["messages"][1]["content"], "planted answer",
        "the row itself is kept: {}",
        planted[0]
    );
}

#[test]
fn filters_can_come_from_a_config_file_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("q.toml"), "min_answer_words = 2\nrefusals = \"default\"\n").unwrap();
    std::fs::write(dir.path().join("c.csv"), "instruction,output\na,b c\nd,e\nf,As an AI language model I refuse\n")
        .unwrap();
    let (out, s) = convert(dir.path(), &["c.csv", "--out", "o.jsonl", "--config", "q.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        (s["rejected_by_reason"]["answer_length"].as_u64(), s["rejected_by_reason"]["refusal"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, s) = convert(dir.path(), &["c.csv", "--out", "o.jsonl", "--config", "q.toml", "--min-answer-words", "1"]);
    assert_eq!(s["rows_kept"], 2, "{s}");
}
