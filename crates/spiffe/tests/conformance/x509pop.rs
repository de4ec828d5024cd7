//! x509pop proofs: only a certificate of the node CA, naming the node,
//! whose key signed this very request, attests.

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use tether_spiffe::x509pop::{PopError, message, verify};

use crate::support::{Ca, now, root_ca};

/// A node certificate with subject CN `cn` under `ca`, and its key.
fn node_cert(ca: &Ca, cn: &str) -> (Vec<u8>, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate().unwrap();
    let der = p.signed_by(&key, &ca.issuer).unwrap().der().to_vec();
    (der, key)
}

fn sign(key: &KeyPair, node: &str, csr: &[u8]) -> Vec<u8> {
    rcgen::SigningKey::sign(key, &message(node, csr)).unwrap()
}

#[test]
fn x509pop_accepts_only_the_node_cas_certificate_naming_the_node_and_signing_this_request() {
    let ca = root_ca("nodes.example");
    let other = root_ca("elsewhere.example");
    let (leaf, key) = node_cert(&ca, "n1");
    let anchors = vec![ca.der.clone()];
    let csr = b"the CSR bytes".to_vec();
    let sig = sign(&key, "n1", &csr);
    verify(&[leaf.clone()], &anchors, "n1", &csr, &sig, now()).expect("a good proof");

    // The same signature for another CSR (a replay with the replayer's key).
    assert!(matches!(
        verify(&[leaf.clone()], &anchors, "n1", b"another CSR", &sig, now()),
        Err(PopError::BadSignature)
    ));
    // Another node's name: the CN decides.
    let sig2 = sign(&key, "n2", &csr);
    assert!(matches!(
        verify(&[leaf.clone()], &anchors, "n2", &csr, &sig2, now()),
        Err(PopError::NameMismatch { .. })
    ));
    // Another CA's certificate, even naming the node.
    let (foreign, fkey) = node_cert(&other, "n1");
    let fsig = sign(&fkey, "n1", &csr);
    assert!(matches!(
        verify(&[foreign], &anchors, "n1", &csr, &fsig, now()),
        Err(PopError::Untrusted(_))
    ));
    // Expired by then (2100).
    assert!(matches!(
        verify(
            &[leaf.clone()],
            &anchors,
            "n1",
            &csr,
            &sig,
            now() + 100 * 365 * 86400
        ),
        Err(PopError::Untrusted(_))
    ));
    // Signed by a key that is not the certificate's.
    let stranger = KeyPair::generate().unwrap();
    assert!(matches!(
        verify(
            &[leaf.clone()],
            &anchors,
            "n1",
            &csr,
            &sign(&stranger, "n1", &csr),
            now()
        ),
        Err(PopError::BadSignature)
    ));
    assert!(matches!(
        verify(&[], &anchors, "n1", &csr, &sig, now()),
        Err(PopError::Empty)
    ));
    assert!(matches!(
        verify(&vec![leaf; 9], &anchors, "n1", &csr, &sig, now()),
        Err(PopError::TooLong(9))
    ));
}
