use tether_spiffe::id::{IdProblem, MAX_SPIFFE_ID_LEN};
use tether_spiffe::{IdError, SpiffeId, TrustDomain};

fn problem(input: &str) -> IdProblem {
    match SpiffeId::parse(input) {
        Ok(id) => panic!("{input:?} was accepted as {id}"),
        Err(e) => e.problem().clone(),
    }
}

#[test]
fn valid_ids() {
    let cases: &[(&str, &str, &str)] = &[
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        (
            "spiffe://example.org/ns/prod/sa/web",
            "example.org",
            "/ns/prod/sa/web",
        ),
        (
            "spiffe://k8s-west.example.com/a_b/C-D/e.f",
            "k8s-west.example.com",
            "/a_b/C-D/e.f",
        ),
        ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
        ("spiffe://under_score/x", "under_score", "/x"),
        (
            "spiffe://example.org/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "example.org",
            "/9eebccd2-12bf-40a6-b262-65fe0487d453",
        ),
        ("spiffe://example.org/...", "example.org", "/..."),
        ("spiffe://example.org/.hidden", "example.org", "/.hidden"),
        (
            "spiffe://example.org/UPPER/Case",
            "example.org",
            "/UPPER/Case",
        ),
    ];
    for (input, td, path) in cases {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input:?} rejected: {e}"));
        assert_eq!(id.as_str(), *input);
        assert_eq!(id.trust_domain().as_str(), *td);
        assert_eq!(id.path(), *path);
        assert_eq!(id.to_string(), *input);
        assert_eq!(input.parse::<SpiffeId>().ok().as_ref(), Some(&id));
    }
}

#[test]
fn invalid_ids() {
    let long_path = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
    let long_td = format!("spiffe://{}/x", "a".repeat(256));
    let cases: Vec<(&str, IdProblem)> = vec![
        ("", IdProblem::Empty),
        ("SPIFFE://example.org/x", IdProblem::SchemeNotLowercase),
        ("Spiffe://example.org/x", IdProblem::SchemeNotLowercase),
        ("https://example.org/x", IdProblem::WrongScheme),
        ("spiffe:/example.org/x", IdProblem::WrongScheme),
        ("example.org/x", IdProblem::WrongScheme),
        ("spiffe://", IdProblem::MissingTrustDomain),
        ("spiffe:///path", IdProblem::MissingTrustDomain),
        (
            "spiffe://Example.org/x",
            IdProblem::TrustDomainUppercase { ch: 'E' },
        ),
        ("spiffe://example.org:8443/x", IdProblem::Port),
        ("spiffe://example.org:/x", IdProblem::Port),
        ("spiffe://user@example.org/x", IdProblem::Userinfo),
        ("spiffe://user:pw@example.org/x", IdProblem::Userinfo),
        (
            "spiffe://exa mple.org/x",
            IdProblem::TrustDomainChar { ch: ' ' },
        ),
        (
            "spiffe://exämple.org/x",
            IdProblem::TrustDomainChar { ch: 'ä' },
        ),
        ("spiffe://[::1]/x", IdProblem::TrustDomainChar { ch: '[' }),
        ("spiffe://ex%41mple.org/x", IdProblem::PercentEncoding),
        ("spiffe://example.org/a%20b", IdProblem::PercentEncoding),
        ("spiffe://example.org/x?query=1", IdProblem::Query),
        ("spiffe://example.org?x", IdProblem::Query),
        ("spiffe://example.org/x#frag", IdProblem::Fragment),
        ("spiffe://example.org#", IdProblem::Fragment),
        ("spiffe://example.org/", IdProblem::TrailingSlash),
        ("spiffe://example.org/a/", IdProblem::TrailingSlash),
        ("spiffe://example.org//a", IdProblem::EmptySegment),
        ("spiffe://example.org/a//b", IdProblem::EmptySegment),
        (
            "spiffe://example.org/.",
            IdProblem::DotSegment {
                segment: ".".into(),
            },
        ),
        (
            "spiffe://example.org/a/../b",
            IdProblem::DotSegment {
                segment: "..".into(),
            },
        ),
        (
            "spiffe://example.org/a/./b",
            IdProblem::DotSegment {
                segment: ".".into(),
            },
        ),
        ("spiffe://example.org/a b", IdProblem::PathChar { ch: ' ' }),
        ("spiffe://example.org/a+b", IdProblem::PathChar { ch: '+' }),
        (
            "spiffe://example.org/caf\u{e9}",
            IdProblem::PathChar { ch: '\u{e9}' },
        ),
        (
            "spiffe://example.org/a\nb",
            IdProblem::PathChar { ch: '\n' },
        ),
        ("spiffe://example.org/a@b", IdProblem::PathChar { ch: '@' }),
        ("spiffe://example.org/a:b", IdProblem::PathChar { ch: ':' }),
        (
            &long_path,
            IdProblem::TooLong {
                len: long_path.len(),
            },
        ),
        (&long_td, IdProblem::TrustDomainTooLong { len: 256 }),
    ];
    for (input, want) in &cases {
        assert_eq!(&problem(input), want, "input {input:?}");
    }
    assert!(cases.len() >= 25);
}

#[test]
fn length_limits_are_inclusive() {
    let prefix = "spiffe://example.org/";
    let exact = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
    assert_eq!(exact.len(), MAX_SPIFFE_ID_LEN);
    assert!(SpiffeId::parse(&exact).is_ok());
    let over = format!("{exact}b");
    assert!(matches!(problem(&over), IdProblem::TooLong { len } if len == MAX_SPIFFE_ID_LEN + 1));

    let td255 = "a".repeat(255);
    assert!(TrustDomain::new(&td255).is_ok());
    assert!(SpiffeId::parse(&format!("spiffe://{td255}/x")).is_ok());
    assert!(TrustDomain::new(&"a".repeat(256)).is_err());
}

#[test]
fn error_message_names_the_problem() {
    let err = SpiffeId::parse("spiffe://Ex.org/a").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid SPIFFE ID "spiffe://Ex.org/a": trust domain contains uppercase character 'E' (only a-z, 0-9, '.', '-', '_' allowed)"#
    );
    // Hostile input is quoted with escapes and truncated.
    let err = SpiffeId::parse(&format!(
        "spiffe://example.org/\u{1b}[2J{}",
        "x".repeat(1000)
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("\\u{1b}"), "{msg}");
    assert!(msg.len() < 600, "{msg}");
}

#[test]
fn trust_domain_forms() {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(td.as_str(), "example.org");
    assert_eq!(td.id_string(), "spiffe://example.org");
    assert_eq!(TrustDomain::new("spiffe://example.org").unwrap(), td);
    assert_eq!(td.to_spiffe_id().as_str(), "spiffe://example.org");

    for bad in [
        "",
        "spiffe://",
        "Example.org",
        "example.org:443",
        "user@example.org",
        "spiffe://example.org/path",
        "example.org/",
        "SPIFFE://example.org",
        "https://example.org",
        "exa%6dple.org",
    ] {
        let err = TrustDomain::new(bad).expect_err(bad);
        assert!(
            matches!(err, IdError::InvalidTrustDomain { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn new_builds_from_parts() {
    let td = TrustDomain::new("example.org").unwrap();
    let id = SpiffeId::new(&td, "/ns/web").unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/ns/web");
    assert_eq!(id.trust_domain(), &td);
    assert!(id.has_path());
    let root = SpiffeId::new(&td, "").unwrap();
    assert_eq!(root.as_str(), "spiffe://example.org");
    assert!(!root.has_path());

    assert_eq!(
        SpiffeId::new(&td, "ns").unwrap_err().problem(),
        &IdProblem::PathNoLeadingSlash
    );
    assert_eq!(
        SpiffeId::new(&td, "/a/").unwrap_err().problem(),
        &IdProblem::TrailingSlash
    );
    assert_eq!(
        SpiffeId::new(&td, "/a?b").unwrap_err().problem(),
        &IdProblem::Query
    );
    assert_eq!(
        SpiffeId::new(&td, "/a#b").unwrap_err().problem(),
        &IdProblem::Fragment
    );
    assert_eq!(
        SpiffeId::new(&td, "/..").unwrap_err().problem(),
        &IdProblem::DotSegment {
            segment: "..".into()
        }
    );
    let long = format!("/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
    assert!(matches!(
        SpiffeId::new(&td, &long).unwrap_err().problem(),
        IdProblem::TooLong { .. }
    ));
}

#[test]
fn serde_round_trip_and_validation() {
    let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, r#""spiffe://example.org/web""#);
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);

    let td = TrustDomain::new("example.org").unwrap();
    let json = serde_json::to_string(&td).unwrap();
    assert_eq!(json, r#""example.org""#);
    assert_eq!(serde_json::from_str::<TrustDomain>(&json).unwrap(), td);

    let err = serde_json::from_str::<SpiffeId>(r#""spiffe://Example.org/web""#).unwrap_err();
    assert!(err.to_string().contains("uppercase"), "{err}");
    assert!(serde_json::from_str::<SpiffeId>("42").is_err());
    assert!(serde_json::from_str::<TrustDomain>(r#""example.org:80""#).is_err());

    // Works inside larger structures, including escaped JSON strings.
    let ids: Vec<SpiffeId> = serde_json::from_str(r#"["spiffe:\/\/a\/b", "spiffe://c"]"#).unwrap();
    assert_eq!(ids[0].as_str(), "spiffe://a/b");
}

#[test]
fn ordering_is_string_ordering() {
    let mut ids: Vec<SpiffeId> = ["spiffe://b/x", "spiffe://a/z", "spiffe://a/y"]
        .iter()
        .map(|s| SpiffeId::parse(s).unwrap())
        .collect();
    ids.sort();
    let got: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
    assert_eq!(got, ["spiffe://a/y", "spiffe://a/z", "spiffe://b/x"]);
}
