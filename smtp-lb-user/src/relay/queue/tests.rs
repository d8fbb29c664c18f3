//! The delivery loop without a socket: a scripted [`Dispatcher`] answers
//! each recipient as told and records the sessions and transactions.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    Queue, QueuedMessage,
    dispatch::{BoxFuture, Dispatcher, Session},
};
use crate::{
    relay::{
        config::Config,
        egress::{Egress, Source},
        log::DeliveryLog,
        metrics::Metrics,
        policy::{
            limiter::Limiters,
            shaping::{Shaper, ShapingConfig},
        },
        route::{Host, Myself, Router},
        spool::Spool,
    },
    smtp::{
        client::{ClientError, Transaction},
        reply::Reply,
    },
};

/// What the scripted destination saw.
#[derive(Default)]
struct Seen {
    connects: usize,
    /// Connections per host name.
    connects_to: HashMap<String, usize>,
    /// (sender, recipients) per transaction.
    transactions: Vec<(String, Vec<String>)>,
}

struct Scripted {
    /// Recipient → reply; others get `250`.
    replies: HashMap<String, Reply>,
    /// Refuse every connection.
    refuse: bool,
    /// Hosts whose connections never complete (a blackhole).
    hang: Vec<String>,
    seen: Arc<Mutex<Seen>>,
}

struct ScriptedSession {
    host: String,
    addr: SocketAddr,
    sent: usize,
    replies: HashMap<String, Reply>,
    seen: Arc<Mutex<Seen>>,
}

impl Dispatcher for Scripted {
    fn connect<'a>(
        &'a self,
        host: &'a Host,
        addr: SocketAddr,
        _source: &'a Source,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, ClientError>> {
        Box::pin(async move {
            {
                let mut seen = self.seen.lock().unwrap();
                seen.connects += 1;
                *seen.connects_to.entry(host.name.clone()).or_default() += 1;
            }
            if self.hang.contains(&host.name) {
                std::future::pending::<()>().await;
            }
            if self.refuse {
                return Err(ClientError::Connect {
                    addr,
                    error: std::io::ErrorKind::ConnectionRefused.into(),
                });
            }
            Ok(Box::new(ScriptedSession {
                host: host.name.clone(),
                addr,
                sent: 0,
                replies: self.replies.clone(),
                seen: self.seen.clone(),
            }) as Box<dyn Session>)
        })
    }
}

impl Session for ScriptedSession {
    fn host(&self) -> &str {
        &self.host
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn local(&self) -> Option<SocketAddr> {
        None
    }

    fn messages_sent(&self) -> usize {
        self.sent
    }

    fn is_tls(&self) -> bool {
        false
    }

    fn send<'a>(
        &'a mut self,
        sender: &'a str,
        rcpts: &'a [String],
        _body: &'a [u8],
    ) -> BoxFuture<'a, Result<Transaction, ClientError>> {
        Box::pin(async move {
            self.seen
                .lock()
                .unwrap()
                .transactions
                .push((sender.to_owned(), rcpts.to_vec()));
            let rcpt_replies: Vec<Reply> = rcpts
                .iter()
                .map(|r| {
                    self.replies
                        .get(r)
                        .cloned()
                        .unwrap_or_else(|| Reply::local(250, "2.1.5", "ok"))
                })
                .collect();
            let accepted = rcpt_replies.iter().any(Reply::is_positive);
            self.sent += usize::from(accepted);
            Ok(Transaction {
                rcpt_replies,
                data_reply: accepted.then(|| Reply::local(250, "2.0.0", "queued")),
            })
        })
    }

    fn quit(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A queue over a fresh spool that delivers through `dispatcher`; retries wait an hour.
fn queue(name: &str, dispatcher: Scripted) -> Arc<Queue> {
    queue_with(name, "", dispatcher)
}

/// [`queue`] with more config: `extra` goes before `[retry]` (top-level
/// keys and tables) and more `[routes]` may follow the default route.
fn queue_with(name: &str, extra: &str, dispatcher: Scripted) -> Arc<Queue> {
    queue_shaped(name, extra, "", dispatcher)
}

/// [`queue_with`] under the shaping file `shaping`.
fn queue_shaped(name: &str, extra: &str, shaping: &str, dispatcher: Scripted) -> Arc<Queue> {
    let dir = std::env::temp_dir().join(format!("smtp-lb-queue-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (extra, more_routes) = extra.split_once("[routes]\n").unwrap_or((extra, ""));
    let cfg: Config = toml::from_str(&format!(
        "spool_dir = {:?}\nlistener = []\n{extra}\n[retry]\nmin = \"1h\"\n[routes]\n\"*\" = \"127.0.0.1:25\"\n{more_routes}",
        dir.display().to_string()
    ))
    .unwrap();
    let (spool, _, _) = Spool::open(&cfg.spool_dir, cfg.spool.compact_interval).unwrap();
    let router = Router::new(&cfg.routes, &cfg.dns, 25, Myself::default()).unwrap();
    let shaper = Shaper::new(&ShapingConfig::parse(shaping).unwrap(), &Limiters::local());
    let egress = Egress::from_config(None, "relay.test", None, shaper.providers()).unwrap();
    Queue::new(
        &cfg,
        spool,
        router,
        DeliveryLog::open(None).unwrap(),
        Arc::new(Metrics::default()),
        shaper,
        egress,
        Box::new(dispatcher),
    )
}

async fn submit(q: &Arc<Queue>, sender: &str, rcpts: &[&str]) -> u64 {
    submit_body(q, sender, rcpts, b"Subject: t\r\n\r\nhello\r\n").await
}

async fn submit_body(q: &Arc<Queue>, sender: &str, rcpts: &[&str], body: &[u8]) -> u64 {
    let rcpts: Vec<String> = rcpts.iter().map(|r| (*r).to_owned()).collect();
    let id = q.spool().allocate_id();
    let received_ms = q.spool().store(id, sender, &rcpts, body).await.unwrap();
    q.submit(QueuedMessage::new(
        id,
        sender.to_owned(),
        rcpts,
        received_ms,
        body.len() as u64,
        std::collections::HashSet::new(),
    ));
    id
}

/// Polls until `f` holds (a few seconds at most).
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn each_recipient_is_delivered_bounced_or_deferred_by_its_reply() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let q = queue(
        "outcomes",
        Scripted {
            replies: HashMap::from([
                (
                    "b@x.test".to_owned(),
                    Reply::local(550, "5.1.1", "user unknown"),
                ),
                (
                    "c@x.test".to_owned(),
                    Reply::local(451, "4.3.0", "try later"),
                ),
            ]),
            refuse: false,
            hang: Vec::new(),
            seen: seen.clone(),
        },
    );
    let id = submit(&q, "s@y.test", &["a@x.test", "b@x.test", "c@x.test"]).await;
    // a@ delivered, b@ bounced (its DSN to s@ delivered too), c@ deferred.
    let m = q.metrics.clone();
    until("two deliveries, one bounce, one deferral", || {
        m.total("delivered") == 2 && m.total("bounced") == 1 && m.total("deferred") == 1
    })
    .await;
    let view = q.show(id).expect("still queued for c@");
    assert_eq!(view.done, vec![0, 1]);
    assert_eq!(view.attempts, 1);
    assert_eq!(view.last_error.as_deref(), Some("451 4.3.0 try later"));
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.transactions,
        vec![
            (
                "s@y.test".to_owned(),
                vec![
                    "a@x.test".to_owned(),
                    "b@x.test".to_owned(),
                    "c@x.test".to_owned()
                ]
            ),
            // The DSN: null sender, to the original sender.
            (String::new(), vec!["s@y.test".to_owned()]),
        ]
    );
    assert_eq!(q.summary()["x.test"].scheduled, 1);
}

#[tokio::test]
async fn a_destination_that_refuses_connections_defers_every_job() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let q = queue(
        "refused",
        Scripted {
            replies: HashMap::new(),
            refuse: true,
            hang: Vec::new(),
            seen: seen.clone(),
        },
    );
    let id = submit(&q, "s@y.test", &["a@x.test", "b@x.test"]).await;
    let m = q.metrics.clone();
    until("two deferrals", || m.total("deferred") == 2).await;
    assert_eq!(m.total("delivered") + m.total("bounced"), 0);
    let view = q.show(id).expect("queued");
    assert!(
        view.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("451 4.4.1 connect to 127.0.0.1:25")),
        "{view:?}"
    );
    assert!(seen.lock().unwrap().transactions.is_empty());
    // The operator bounces it: a DSN goes to the sender, whose domain refuses too.
    assert_eq!(q.bounce_now(id).await, 1);
    until("the message is gone", || q.show(id).is_none()).await;
    assert_eq!(m.total("bounced"), 2);
}

#[tokio::test]
async fn a_dead_destination_holds_only_its_own_connections() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let q = queue_with(
        "dead-destination",
        "[delivery]\nconnections_per_destination = 2\nconnections_per_queue = 4\n[routes]\n\"dead.test\" = \"127.0.0.2:25\"\n",
        Scripted {
            replies: HashMap::new(),
            refuse: false,
            hang: vec!["127.0.0.2".to_owned()],
            seen: seen.clone(),
        },
    );
    for i in 0..6 {
        submit(&q, "s@y.test", &[&format!("r{i}@dead.test")]).await;
    }
    until("the dead destination holds its two slots", || {
        seen.lock().unwrap().connects_to.get("127.0.0.2") == Some(&2)
    })
    .await;
    // Same (source, provider) queue, another destination: served at once.
    submit(&q, "s@y.test", &["a@live.test"]).await;
    let m = q.metrics.clone();
    until("the live destination's delivery", || {
        m.total("delivered") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.lock().unwrap().connects_to["127.0.0.2"], 2);
}

#[tokio::test]
async fn a_message_over_the_hop_limit_bounces_5_4_6_without_an_attempt() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let q = queue_with(
        "hops",
        "[delivery]\nhop_limit = 3\n",
        Scripted {
            replies: HashMap::new(),
            refuse: false,
            hang: Vec::new(),
            seen: seen.clone(),
        },
    );
    let three = "Received: from a by b\r\n".repeat(3);
    submit_body(
        &q,
        "s@y.test",
        &["ok@x.test"],
        format!("{three}Subject: t\r\n\r\nhi\r\n").as_bytes(),
    )
    .await;
    let m = q.metrics.clone();
    until("three hops: delivered", || m.total("delivered") == 1).await;
    let four = "Received: from a by b\r\n".repeat(4);
    let id = submit_body(
        &q,
        "s@y.test",
        &["loop@x.test"],
        format!("{four}Subject: t\r\n\r\nhi\r\n").as_bytes(),
    )
    .await;
    until("four hops: bounced, its DSN delivered", || {
        m.total("bounced") == 1 && m.total("delivered") == 2
    })
    .await;
    assert!(q.show(id).is_none());
    let seen = seen.lock().unwrap();
    // Two transactions: the three-hop message and the DSN; none for the looping one.
    assert_eq!(seen.transactions.len(), 2);
    assert_eq!(
        seen.transactions[1],
        (String::new(), vec!["s@y.test".to_owned()])
    );
}

/// A scripted destination that answers `250` to everyone.
fn accepting(seen: &Arc<Mutex<Seen>>) -> Scripted {
    Scripted {
        replies: HashMap::new(),
        refuse: false,
        hang: Vec::new(),
        seen: seen.clone(),
    }
}

#[tokio::test]
async fn a_message_arriving_while_the_connection_is_idle_goes_over_it() {
    for (idle, connects) in [("2s", 1), ("0s", 2)] {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let q = queue_with(
            &format!("idle-{idle}"),
            &format!("[delivery]\nconnection_idle = \"{idle}\"\n"),
            accepting(&seen),
        );
        let m = q.metrics.clone();
        submit(&q, "s@y.test", &["a@x.test"]).await;
        until("the first delivery", || m.total("delivered") == 1).await;
        // The first message is done and its connection has nothing to send.
        tokio::time::sleep(Duration::from_millis(50)).await;
        submit(&q, "s@y.test", &["b@x.test"]).await;
        until("the second delivery", || m.total("delivered") == 2).await;
        assert_eq!(seen.lock().unwrap().connects, connects, "idle {idle}");
    }
}

#[tokio::test]
async fn an_idle_connection_gives_way_to_another_destination_at_once() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    // One worker for the queue, and idle connections kept for an hour.
    let q = queue_with(
        "idle-gives-way",
        "[delivery]\nconnections_per_queue = 1\nconnection_idle = \"1h\"\n[routes]\n\"other.test\" = \"127.0.0.3:25\"\n",
        accepting(&seen),
    );
    let m = q.metrics.clone();
    submit(&q, "s@y.test", &["a@x.test"]).await;
    until("the first delivery", || m.total("delivered") == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The only worker is parked on x.test: it must close that connection
    // and take this one (`until` gives up after about 5 s, not an hour).
    submit(&q, "s@y.test", &["b@other.test"]).await;
    until("the other destination's delivery", || {
        m.total("delivered") == 2
    })
    .await;
    assert_eq!(seen.lock().unwrap().connects_to["127.0.0.3"], 1);
}

#[tokio::test]
async fn an_idle_connection_gives_its_slot_to_a_worker_waiting_for_one() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    // One connection slot for the provider, idle connections kept for an hour.
    let q = queue_shaped(
        "idle-slot",
        "[delivery]\nconnection_idle = \"1h\"\n[routes]\n\"other.test\" = \"127.0.0.3:25\"\n",
        "[default]\nconnection_limit = 1\n",
        accepting(&seen),
    );
    let m = q.metrics.clone();
    submit(&q, "s@y.test", &["a@x.test"]).await;
    until("the first delivery", || m.total("delivered") == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The parked connection holds the only slot; these wait for it.
    for i in 0..3 {
        submit(&q, "s@y.test", &[&format!("r{i}@other.test")]).await;
    }
    until("the other destination's deliveries", || {
        m.total("delivered") == 4
    })
    .await;
}
