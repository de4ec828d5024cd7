use rcgen::{BasicConstraints, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use tether_spiffe::Bundle;
use tether_spiffe::x509::{SvidError, check_x509_svid_leaf, verify_x509_svid};

use crate::support::{intermediate_ca, issue, leaf_params, now, root_ca, td, with_uris};

const ID: &str = "spiffe://example.org/ns/prod/web";

fn check_err(params: &rcgen::CertificateParams) -> SvidError {
    let der = issue(params, &root_ca("example.org"));
    check_x509_svid_leaf(&der).unwrap_err()
}

fn bundle_with(cas: &[&[u8]]) -> Bundle {
    let mut bundle = Bundle::new(td("example.org"));
    bundle.x509_authorities = cas.iter().map(|c| c.to_vec()).collect();
    bundle
}

#[test]
fn conforming_leaf_accepted() {
    let der = issue(&leaf_params(ID), &root_ca("example.org"));
    assert_eq!(check_x509_svid_leaf(&der).unwrap().as_str(), ID);

    // EKU is optional; keyEncipherment/keyAgreement are allowed; cA may be
    // left out entirely (RFC 5280 default false); DNS SANs may accompany.
    let mut params = leaf_params(ID);
    params.extended_key_usages.clear();
    params.key_usages.push(KeyUsagePurpose::KeyAgreement);
    params.is_ca = IsCa::NoCa;
    params.subject_alt_names.push(rcgen::SanType::DnsName(
        "web.example.org".try_into().unwrap(),
    ));
    let der = issue(&params, &root_ca("example.org"));
    assert_eq!(check_x509_svid_leaf(&der).unwrap().as_str(), ID);

    // Empty subject: rcgen marks the SAN critical, as section 3.1 requires.
    let mut params = leaf_params(ID);
    params.distinguished_name = DistinguishedName::new();
    let der = issue(&params, &root_ca("example.org"));
    assert!(check_x509_svid_leaf(&der).is_ok());
}

#[test]
fn uri_san_count_enforced() {
    let two = with_uris(leaf_params(ID), &[ID, "spiffe://example.org/other"]);
    assert!(matches!(
        check_err(&two),
        SvidError::UriSanCount { count: 2 }
    ));
    let mixed = with_uris(leaf_params(ID), &[ID, "https://example.org/"]);
    assert!(matches!(
        check_err(&mixed),
        SvidError::UriSanCount { count: 2 }
    ));
    let mut none = leaf_params(ID);
    none.subject_alt_names = vec![rcgen::SanType::DnsName("a.example.org".try_into().unwrap())];
    assert!(matches!(
        check_err(&none),
        SvidError::UriSanCount { count: 0 }
    ));
    let mut no_san = leaf_params(ID);
    no_san.subject_alt_names.clear();
    assert!(matches!(check_err(&no_san), SvidError::NoSubjectAltName));
}

#[test]
fn spiffe_id_rules_enforced() {
    let bad = with_uris(leaf_params(ID), &["spiffe://Example.org/web"]);
    assert!(matches!(check_err(&bad), SvidError::InvalidSpiffeId(_)));
    let bad = with_uris(leaf_params(ID), &["https://example.org/web"]);
    assert!(matches!(check_err(&bad), SvidError::InvalidSpiffeId(_)));
    let root = with_uris(leaf_params(ID), &["spiffe://example.org"]);
    assert!(matches!(check_err(&root), SvidError::NoPath(_)));
}

#[test]
fn leaf_must_not_be_a_ca() {
    let mut params = leaf_params(ID);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert!(matches!(check_err(&params), SvidError::LeafIsCa));
}

#[test]
fn key_usage_rules_enforced() {
    let mut params = leaf_params(ID);
    params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(check_err(&params), SvidError::NoDigitalSignature));

    let mut params = leaf_params(ID);
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    assert!(matches!(check_err(&params), SvidError::KeyCertSign));

    let mut params = leaf_params(ID);
    params.key_usages.push(KeyUsagePurpose::CrlSign);
    assert!(matches!(check_err(&params), SvidError::CrlSign));

    let mut params = leaf_params(ID);
    params.key_usages.clear();
    assert!(matches!(check_err(&params), SvidError::NoKeyUsage));
}

#[test]
fn extended_key_usage_rules_enforced() {
    let mut params = leaf_params(ID);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert!(matches!(
        check_err(&params),
        SvidError::MissingExtendedKeyUsage("clientAuth")
    ));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    assert!(matches!(
        check_err(&params),
        SvidError::MissingExtendedKeyUsage("serverAuth")
    ));
}

#[test]
fn garbage_is_an_error() {
    assert!(matches!(
        check_x509_svid_leaf(b""),
        Err(SvidError::Parse { .. })
    ));
    assert!(matches!(
        check_x509_svid_leaf(&[0x30, 0x82, 0xff, 0xff]),
        Err(SvidError::Parse { .. })
    ));
    let mut der = issue(&leaf_params(ID), &root_ca("example.org"));
    der.push(0);
    assert!(matches!(
        check_x509_svid_leaf(&der),
        Err(SvidError::Parse { .. })
    ));
    // Every truncation of a valid certificate fails cleanly.
    let der = issue(&leaf_params(ID), &root_ca("example.org"));
    for len in (0..der.len()).step_by(7) {
        assert!(check_x509_svid_leaf(&der[..len]).is_err());
    }
}

#[test]
fn chain_verifies_against_its_bundle() {
    let t = now();
    let root = root_ca("example.org");
    let leaf = issue(&leaf_params(ID), &root);
    let bundle = bundle_with(&[&root.der]);
    assert_eq!(
        verify_x509_svid(std::slice::from_ref(&leaf), &bundle, t)
            .unwrap()
            .as_str(),
        ID
    );

    // Through an intermediate.
    let mid = intermediate_ca(&root, "example.org");
    let leaf2 = issue(&leaf_params(ID), &mid);
    assert_eq!(
        verify_x509_svid(&[leaf2.clone(), mid.der.clone()], &bundle, t)
            .unwrap()
            .as_str(),
        ID
    );
    // Without the intermediate there is no path.
    assert!(matches!(
        verify_x509_svid(&[leaf2], &bundle, t),
        Err(SvidError::Verify(_))
    ));

    // A bundle with several roots, the right one last.
    let other = root_ca("example.org");
    let bundle = bundle_with(&[&other.der, &root.der]);
    assert!(verify_x509_svid(&[leaf], &bundle, t).is_ok());
}

#[test]
fn chain_fails_against_another_ca() {
    let t = now();
    let root = root_ca("example.org");
    let leaf = issue(&leaf_params(ID), &root);
    let other = root_ca("example.org");
    let err = verify_x509_svid(&[leaf], &bundle_with(&[&other.der]), t).unwrap_err();
    assert!(matches!(err, SvidError::Verify(_)), "{err}");
}

#[test]
fn trust_domain_must_match_bundle() {
    let t = now();
    // The bundle's CA signed the leaf, but the leaf names another domain.
    let root = root_ca("example.org");
    let leaf = issue(&leaf_params("spiffe://evil.org/web"), &root);
    let err = verify_x509_svid(&[leaf], &bundle_with(&[&root.der]), t).unwrap_err();
    assert!(
        matches!(err, SvidError::TrustDomainMismatch { .. }),
        "{err}"
    );
}

#[test]
fn time_and_inputs_checked() {
    let root = root_ca("example.org");
    let mut params = leaf_params(ID);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    let leaf = issue(&params, &root);
    let bundle = bundle_with(&[&root.der]);
    let err = verify_x509_svid(std::slice::from_ref(&leaf), &bundle, now()).unwrap_err();
    assert!(
        matches!(err, SvidError::Verify(webpki::Error::CertExpired { .. })),
        "{err}"
    );
    // 2000-06-01 is inside the validity window.
    assert!(verify_x509_svid(std::slice::from_ref(&leaf), &bundle, 959_817_600).is_ok());
    assert!(matches!(
        verify_x509_svid(std::slice::from_ref(&leaf), &bundle, -1),
        Err(SvidError::BadTime(-1))
    ));

    assert!(matches!(
        verify_x509_svid(&[], &bundle, now()),
        Err(SvidError::EmptyChain)
    ));
    let long = vec![leaf.clone(); tether_spiffe::x509::MAX_CHAIN_LEN + 1];
    assert!(matches!(
        verify_x509_svid(&long, &bundle, now()),
        Err(SvidError::ChainTooLong { .. })
    ));
    let empty = Bundle::new(td("example.org"));
    assert!(matches!(
        verify_x509_svid(std::slice::from_ref(&leaf), &empty, now()),
        Err(SvidError::NoAuthorities(_))
    ));
    let broken = bundle_with(&[b"junk"]);
    assert!(matches!(
        verify_x509_svid(&[leaf], &broken, now()),
        Err(SvidError::BadAuthority { index: 0, .. })
    ));
}

#[test]
fn intermediates_must_be_signing_certificates() {
    let t = now();
    let root = root_ca("example.org");
    let bundle = bundle_with(&[&root.der]);
    let leaf = issue(&leaf_params(ID), &root);
    // A leaf SVID passed where an intermediate belongs.
    let bogus = issue(&leaf_params("spiffe://example.org/other"), &root);
    let err = verify_x509_svid(&[leaf, bogus], &bundle, t).unwrap_err();
    assert!(
        matches!(err, SvidError::BadIntermediate { index: 1, .. }),
        "{err}"
    );
}

/// DER of a subjectAltName value holding one URI (short URIs only).
fn san_der(uri: &str) -> Vec<u8> {
    let mut inner = vec![0x86, uri.len() as u8];
    inner.extend_from_slice(uri.as_bytes());
    let mut der = vec![0x30, inner.len() as u8];
    der.extend(inner);
    der
}

#[test]
fn extension_criticality_and_duplicates() {
    // keyUsage {digitalSignature} as a non-critical custom extension.
    let ku_digital_signature = vec![0x03, 0x02, 0x07, 0x80];
    let mut params = leaf_params(ID);
    params.key_usages.clear();
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[2, 5, 29, 15],
        ku_digital_signature.clone(),
    )];
    assert!(matches!(check_err(&params), SvidError::KeyUsageNotCritical));

    // The same extension twice.
    let mut params = leaf_params(ID);
    let mut dup = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], ku_digital_signature);
    dup.set_criticality(true);
    params.custom_extensions = vec![dup];
    assert!(matches!(check_err(&params), SvidError::Extensions { .. }));

    // Empty subject with a non-critical SAN.
    let mut params = leaf_params(ID);
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names.clear();
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        san_der(ID),
    )];
    assert!(matches!(
        check_err(&params),
        SvidError::SubjectAltNameNotCritical
    ));
    // The same SAN marked critical is fine.
    let mut san = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], san_der(ID));
    san.set_criticality(true);
    params.custom_extensions = vec![san];
    let der = issue(&params, &root_ca("example.org"));
    assert_eq!(check_x509_svid_leaf(&der).unwrap().as_str(), ID);

    // A malformed extension body.
    let mut params = leaf_params(ID);
    params.key_usages.clear();
    let mut broken = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x04, 0x01]);
    broken.set_criticality(true);
    params.custom_extensions = vec![broken];
    let err = check_err(&params);
    assert!(matches!(err, SvidError::Extensions { .. }), "{err}");
}

#[test]
fn split_certificates_splits_and_rejects() {
    use tether_spiffe::x509::{MAX_CHAIN_LEN, split_certificates};
    let key = rcgen::KeyPair::generate().unwrap();
    let a = rcgen::CertificateParams::new(vec!["a.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let b = rcgen::CertificateParams::new(vec!["b.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let both = [a.der().to_vec(), b.der().to_vec()].concat();
    assert_eq!(
        split_certificates(&both).unwrap(),
        vec![a.der().to_vec(), b.der().to_vec()]
    );
    assert!(
        split_certificates(&both[..both.len() - 1]).is_err(),
        "truncated"
    );
    assert!(split_certificates(&[0x30, 0x82, 0xff]).is_err());
    assert!(split_certificates(&a.der().repeat(MAX_CHAIN_LEN + 1)).is_err());
    assert!(split_certificates(&[]).unwrap().is_empty());
}
