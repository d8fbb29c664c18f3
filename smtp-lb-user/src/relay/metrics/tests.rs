use super::*;

#[test]
fn the_page_names_every_family_once_and_escapes_labels() {
    let m = Metrics::new();
    m.count("gmail.test", "delivered");
    m.count_pair("gmail", "a\"b", "deferred", "4.7.28");
    m.accepted.fetch_add(2, Ordering::Relaxed);
    let page = m.render(3, 7, EgressSample::default());
    assert!(
        page.contains(
            "smtp_lb_relay_recipients_total{domain=\"gmail.test\",status=\"delivered\"} 1\n"
        ),
        "{page}"
    );
    assert!(page.contains("smtp_lb_relay_egress_recipients_total{provider=\"gmail\",source=\"a\\\"b\",status=\"deferred\",code=\"4.7.28\"} 1\n"), "{page}");
    assert!(
        page.contains("smtp_lb_relay_messages_accepted_total 2\n"),
        "{page}"
    );
    assert!(page.contains("smtp_lb_relay_queue_messages 3\n"), "{page}");
    assert!(
        page.contains("smtp_lb_relay_queue_oldest_message_age_seconds 7\n"),
        "{page}"
    );
    assert!(!page.contains("cluster"), "no [cluster], no cluster series");
    let types: Vec<&str> = page.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut unique = types.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(types.len(), unique.len(), "{page}");
}

#[test]
fn domains_past_the_bound_count_as_other() {
    let m = Metrics::new();
    for i in 0..DOMAIN_LABELS + 5 {
        m.count(&format!("d{i}.test"), "delivered");
    }
    let page = m.render(0, 0, EgressSample::default());
    assert!(
        page.contains("smtp_lb_relay_recipients_total{domain=\"other\",status=\"delivered\"} 5\n"),
        "{page}"
    );
    assert_eq!(
        page.matches("smtp_lb_relay_recipients_total{").count(),
        DOMAIN_LABELS + 1
    );
}
