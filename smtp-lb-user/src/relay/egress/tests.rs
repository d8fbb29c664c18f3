//! Pools, selection and warmup spill, as a spec.
use super::*;

fn egress(toml_text: &str) -> anyhow::Result<Egress> {
    let e: EgressConfig = toml::from_str(toml_text)?;
    Egress::build(&e, "relay.test", &Providers::default(), SystemTime::now())
}

const THREE: &str = "default_pool = \"main\"\n\
    [[source]]\nname = \"a\"\naddress = \"198.51.100.21\"\nhelo = \"a.test\"\n\
    [[source]]\nname = \"b\"\naddress = \"198.51.100.22\"\n\
    [[source]]\nname = \"c\"\naddress = \"198.51.100.23\"\n\
    [[pool]]\nname = \"main\"\nsources = [{ name = \"a\", weight = 2 }, { name = \"b\" }, { name = \"c\" }]\n";

#[test]
fn smooth_wrr_interleaves_2_1_1_and_keeps_proportions() {
    let w = [2, 1, 1];
    let mut cur = [0; 3];
    let seq: Vec<usize> = (0..8)
        .map(|_| smooth_wrr(&w, &mut cur, |_| true).unwrap())
        .collect();
    assert_eq!(seq, [0, 1, 2, 0, 0, 1, 2, 0]);
    let mut counts = [0; 3];
    let w = [5, 3, 1];
    let mut cur = [0; 3];
    for _ in 0..900 {
        counts[smooth_wrr(&w, &mut cur, |_| true).unwrap()] += 1;
    }
    assert_eq!(counts, [500, 300, 100]);
    // An ineligible member is skipped; the rest keep their ratio.
    let mut counts = [0; 3];
    let mut cur = [0; 3];
    for _ in 0..300 {
        counts[smooth_wrr(&[2, 1, 1], &mut cur, |k| k != 1).unwrap()] += 1;
    }
    assert_eq!(counts, [200, 0, 100]);
    assert_eq!(smooth_wrr(&[1], &mut [0], |_| false), None);
}

#[test]
fn pools_select_and_default_helo() {
    let e = egress(&format!(
        "{THREE}[[pool]]\nname = \"news\"\nsources = [{{ name = \"c\" }}]\n\
         [[select]]\nsender_domain = \"News.example.com\"\npool = \"news\"\n\
         [[select]]\nsender = \"ceo@example.com\"\npool = \"news\"\n"
    ))
    .unwrap();
    assert_eq!(e.pool_name(e.pool_for("x@news.example.com", None)), "news");
    assert_eq!(e.pool_name(e.pool_for("CEO@example.com", None)), "news");
    assert_eq!(e.pool_name(e.pool_for("other@example.com", None)), "main");
    let t = egress(&format!(
        "tenant_header = \"X-Tenant\"\n{THREE}[[pool]]\nname = \"acme\"\nsources = [{{ name = \"b\" }}]\n\
         [[select]]\ntenant = \"acme\"\npool = \"acme\"\n"
    ))
    .unwrap();
    assert_eq!(t.pool_name(t.pool_for("x@y", Some("acme"))), "acme");
    assert_eq!(t.pool_name(t.pool_for("x@y", Some("other"))), "main");
    assert_eq!(t.pool_name(t.pool_for("x@y", None)), "main");
    assert_eq!(e.sources[0].helo, "a.test");
    assert_eq!(e.sources[1].helo, "relay.test");
    let picks: Vec<Pick> = (0..4).map(|_| e.pick(0, "google", None)).collect();
    assert_eq!(
        picks,
        [
            Pick::Source(0),
            Pick::Source(1),
            Pick::Source(2),
            Pick::Source(0)
        ]
    );
}

#[test]
fn bad_egress_configs_are_refused_naming_the_field() {
    let cases = [
        (
            THREE.replace("name = \"c\" }]", "name = \"x\" }]"),
            "sources[2]: unknown source \"x\"",
        ),
        (
            THREE.replace("weight = 2", "weight = 0"),
            "weight must be at least 1",
        ),
        (
            THREE.replace("default_pool = \"main\"", "default_pool = \"mian\""),
            "default_pool: unknown pool \"mian\"",
        ),
        (
            THREE.replace("name = \"b\"\naddress", "name = \"a\"\naddress"),
            "duplicate source name",
        ),
        (
            format!("{THREE}[[pool]]\nname = \"main\"\nsources = [{{ name = \"a\" }}]\n"),
            "[[egress.pool]] #2 (\"main\"): duplicate pool name",
        ),
        (
            format!("{THREE}[[select]]\npool = \"main\"\n"),
            "[[egress.select]] #1: needs exactly one of",
        ),
        (
            format!(
                "{THREE}[[select]]\nsender = \"a@b\"\nsender_domain = \"b\"\npool = \"main\"\n"
            ),
            "[[egress.select]] #1: needs exactly one of",
        ),
        (
            format!("{THREE}[[select]]\nsender = \"a@b\"\npool = \"nope\"\n"),
            "[[egress.select]] #1: pool: unknown pool \"nope\"",
        ),
        (
            format!("{THREE}[warmup.gmail]\ndaily = [1]\n"),
            "[egress.warmup.gmail]: unknown provider",
        ),
        (
            THREE.replace("helo = \"a.test\"", "warmup_start = \"2026-13-01\""),
            "warmup_start: bad date",
        ),
    ];
    for (text, want) in cases {
        let e = format!("{:#}", egress(&text).unwrap_err());
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
}

#[test]
fn spill_moves_over_cap_messages_to_warm_sources_and_wait_holds_them() {
    let cold = THREE.replace("helo = \"a.test\"", "warmup_start = \"now\"");
    let e = egress(&format!(
        "warmup_day = \"24h\"\n{cold}[warmup.default]\ndaily = [2]\n"
    ))
    .unwrap();
    let picks: Vec<Pick> = (0..8).map(|_| e.pick(0, "default", None)).collect();
    let on_a = picks.iter().filter(|p| **p == Pick::Source(0)).count();
    assert_eq!(on_a, 2, "{picks:?}");
    assert!(picks.iter().all(|p| matches!(p, Pick::Source(_))));
    let e = egress(&format!(
        "{cold}[warmup.default]\ndaily = [1]\noverflow = \"wait\"\n"
    ))
    .unwrap();
    assert_eq!(e.pick(0, "default", None), Pick::Source(0));
    assert_eq!(e.pick(0, "default", None), Pick::Source(1));
    assert_eq!(e.pick(0, "default", None), Pick::Source(2));
    assert!(matches!(
        e.pick(0, "default", None),
        Pick::Wait {
            source: Some(0),
            ..
        }
    ));
}
