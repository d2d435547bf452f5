//! The mappings over real QUIC through the proxy: what each does with a clean link and with
//! a cut longer than the budget.

use std::time::Duration;

use tern_bench_link::impair::Profile;
use tern_bench_link::mapping::{compare, Mapping, Settings};

const ALL: [Mapping; 4] = [
    Mapping::Ordered,
    Mapping::StreamPerFrame,
    Mapping::Group { frames: 5 },
    Mapping::Datagram,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_link_delivers_every_frame_in_every_mapping() {
    let settings = Settings::new(Duration::from_secs(1), 1, Duration::from_millis(300));
    let outcomes = compare(&Profile::default(), &ALL, &settings).await.unwrap();
    assert_eq!(outcomes.len(), ALL.len());
    for o in &outcomes {
        assert_eq!(o.sent(), 50, "{}", o.mapping);
        assert_eq!((o.lost(), o.late()), (0, 0), "{}", o.mapping);
        assert_eq!(o.skipped, 0, "{}", o.mapping);
        // Every frame crossed the proxy: at least 50 × 100 payload bytes went down.
        assert!(o.wire[1] > 5_000, "{}: {:?}", o.mapping, o.wire);
    }
}

/// A 700 ms cut, both ways, on a path with 20 ms RTT. Reliable mappings deliver everything,
/// late; the group mapping gives up what cannot arrive within the budget; datagrams lose
/// what was sent into the cut and nothing else is late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_budget_is_late_on_streams_and_lost_with_resets() {
    let ms = Duration::from_millis;
    let profile = Profile {
        cuts: vec![(ms(1000), ms(1700))],
        ..Profile::rtt_loss(ms(20), 0.0)
    };
    let settings = Settings::new(Duration::from_secs(3), 1, ms(300));
    let outcomes = compare(&profile, &ALL, &settings).await.unwrap();
    let [ordered, per_frame, group, datagram] = outcomes.as_slice() else {
        panic!("{outcomes:?}");
    };
    let max = |o: &tern_bench_link::mapping::Outcome| o.quantile(1.0).unwrap();
    for o in &outcomes {
        eprintln!(
            "{}: lost {} late {} max {:?}",
            o.mapping,
            o.lost(),
            o.late(),
            max(o)
        );
    }

    for o in [ordered, per_frame] {
        assert_eq!(o.lost(), 0, "{} retransmits everything", o.mapping);
        // The frame sent as the cut began waited for all of it.
        assert!(max(o) >= ms(650), "{}: {:?}", o.mapping, max(o));
        assert!(o.late() >= 15, "{}: {} late", o.mapping, o.late());
    }

    // 700 ms of frames (35) went into the cut; those older than the budget when it ended
    // are abandoned, and what does arrive is at most a little over the budget.
    assert!(
        group.lost() >= 10,
        "{} lost {}",
        group.mapping,
        group.lost()
    );
    assert!(
        group.lost() <= 40,
        "{} lost {}",
        group.mapping,
        group.lost()
    );
    assert!(max(group) < ms(500), "{}: {:?}", group.mapping, max(group));
    assert!(group.arrived() > ordered.arrived() - 40);

    assert!(
        datagram.lost() >= 30,
        "{} lost {}",
        datagram.mapping,
        datagram.lost()
    );
    assert!(
        datagram.lost() <= 40,
        "{} lost {}",
        datagram.mapping,
        datagram.lost()
    );
    assert_eq!(datagram.late(), 0, "{}", datagram.mapping);
}
