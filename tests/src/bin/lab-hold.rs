//! Creates a small lab, prints its namespaces (one line, space-separated)
//! and waits to be killed. The lab-harness tests SIGKILL it to prove that
//! the next `Lab::new` removes what a killed run left behind.
use smtp_lb_tests::lab::Lab;

fn main() {
    let mut lab = Lab::new();
    lab.host("a", &["198.51.100.1/24"]);
    std::fs::create_dir_all(lab.pin_dir()).expect("create pin dir");
    println!("{} {}", lab.pin_dir().display(), lab.namespaces().join(" "));
    loop {
        std::thread::park();
    }
}
