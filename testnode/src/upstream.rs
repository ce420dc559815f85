//! kube-proxy's own expected rules, recorded from its tests and renumbered
//! into the project's test ranges (source, licence and the renumbering in
//! each fixture's header). Chain names hash the endpoint as kube-proxy saw
//! it, so a test that computes a name needs kube-proxy's original address:
//! it is read from the fixture's header, never written in code.

/// The fixture's endpoint renumbering, from its header's "endpoints
/// ORIGINAL.N -> OURS.N": (original prefix, our prefix), e.g. the two
/// prefixes before the `N`.
pub fn endpoint_renumbering(fixture: &str) -> (String, String) {
    let header: String = fixture
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = header.split_whitespace().collect();
    let at = words
        .windows(4)
        .position(|w| w[0] == "endpoints" && w[2] == "->")
        .expect("the fixture's header records its endpoint renumbering");
    let prefix = |w: &str| {
        w.trim_end_matches([',', ')', ';'])
            .strip_suffix('N')
            .expect("a renumbered prefix ends in N")
            .to_string()
    };
    (prefix(words[at + 1]), prefix(words[at + 3]))
}

/// An endpoint in our ranges as kube-proxy's test had it.
pub fn as_kube_proxy_saw_it(fixture: &str, endpoint: &str) -> String {
    let (original, ours) = endpoint_renumbering(fixture);
    endpoint.replace(&ours, &original)
}

/// A name computed from kube-proxy's original address, renumbered as the
/// fixture is.
pub fn renumbered(fixture: &str, name: &str) -> String {
    let (original, ours) = endpoint_renumbering(fixture);
    name.replace(&original, &ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_fixtures_record_the_same_renumbering_of_endpoints() {
        let ipt = include_str!("../../agent/tests/fixtures/kube-proxy-upstream-nodeports.txt");
        let nft = include_str!("../../agent/tests/fixtures/kube-proxy-upstream-nftables.nft");
        let (_, ours) = endpoint_renumbering(ipt);
        assert_eq!(ours, "198.18.180.");
        assert_eq!(endpoint_renumbering(ipt), endpoint_renumbering(nft));
        let back = as_kube_proxy_saw_it(ipt, "198.18.180.4:80");
        assert_ne!(back, "198.18.180.4:80");
        assert_eq!(renumbered(ipt, &back), "198.18.180.4:80");
    }
}
