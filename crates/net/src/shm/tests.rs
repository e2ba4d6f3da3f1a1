//! The shared memory's slots: sequence locks, reads in place, writes given up or taken over.

use super::*;

/// The server's file as worker `worker` of a model of `len` values opens it.
fn opened(server: &SharedRegion, len: usize, worker: u32) -> Arc<SharedRegion> {
    Arc::new(SharedRegion::open(server.path().to_str().unwrap(), server.nonce(), len, worker).unwrap())
}

/// Worker `worker`'s gradient of `step` written into its slot; the write's sequence number.
fn write_gradient(region: &Arc<SharedRegion>, worker: u32, step: u64, values: &[f32]) -> u64 {
    let mut write = region.gradient_write(worker).expect("the slot is free");
    write.values().copy_from_slice(values);
    write.finish(step)
}

#[test]
fn a_worker_reads_the_parameters_the_server_published_and_the_server_the_gradient_the_worker_wrote() {
    let server = SharedRegion::create(5, 2).unwrap();
    let worker = opened(&server, 5, 1);
    server.publish(7, &[1.0, 2.0, 3.0, 4.0, 5.0]);
    let mut got = Vec::new();
    worker.read_params(7, &mut got).unwrap();
    assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 5.0]);
    let seq = write_gradient(&worker, 1, 7, &[0.5; 5]);
    assert_eq!(server.gradient(1, 7, seq).unwrap().values(), [0.5; 5]);
}

#[test]
fn a_worker_sees_the_newest_published_step_at_once() {
    let server = SharedRegion::create(2, 1).unwrap();
    let worker = opened(&server, 2, 0);
    assert_eq!(worker.newest(), None, "nothing published yet");
    server.publish(0, &[1.0; 2]);
    assert_eq!(worker.newest(), Some(0));
    server.publish(3, &[1.0; 2]);
    assert_eq!(worker.newest(), Some(3));
    assert_eq!(server.newest(), Some(3));
    server.close_all();
    assert!(worker.newest().is_some_and(|n| n > 1 << 60), "stopping closes every step");
}

#[test]
fn a_worker_awaiting_a_step_sleeps_until_the_server_publishes_it() {
    let server = Arc::new(SharedRegion::create(2, 1).unwrap());
    let worker = opened(&server, 2, 0);
    server.publish(4, &[1.0; 2]);
    assert_eq!(worker.wait_newest(3, &|| panic!("no wait: published")), Some(4));
    // Publishing steps 5 and 6 from another thread (a process, in a real run) after a while:
    // the wait sleeps through step 5 and returns step 6, the first of at least 6.
    let publisher = {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            for step in [5, 6] {
                std::thread::sleep(std::time::Duration::from_millis(50));
                server.publish(step, &[step as f32; 2]);
            }
        })
    };
    let t = std::time::Instant::now();
    assert_eq!(worker.wait_newest(6, &|| false), Some(6));
    assert!(t.elapsed() >= std::time::Duration::from_millis(100), "returned before step 6: {:?}", t.elapsed());
    publisher.join().unwrap();
}

#[test]
fn a_wait_for_a_step_ends_when_its_worker_gives_up_or_the_server_stops() {
    let server = Arc::new(SharedRegion::create(2, 1).unwrap());
    let worker = opened(&server, 2, 0);
    server.publish(0, &[1.0; 2]);
    // Given up: asked again at least every 20 ms, so a lost server ends the wait.
    let asked = std::sync::atomic::AtomicU32::new(0);
    let give_up = || asked.fetch_add(1, Ordering::Relaxed) == 3;
    assert_eq!(worker.wait_newest(1, &give_up), None);
    // "Stop": every step reads as published, and the worker sees why.
    let stopper = {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            server.close_all();
        })
    };
    assert!(!worker.is_closed());
    assert!(worker.wait_newest(1, &|| false).is_some());
    assert!(worker.is_closed());
    stopper.join().unwrap();
}

#[test]
fn parameters_viewed_in_place_are_intact_until_a_later_step_rewrites_their_slot() {
    let server = SharedRegion::create(3, 1).unwrap();
    let worker = opened(&server, 3, 0);
    assert_eq!(worker.view_params(1).unwrap_err(), SlotError::Other, "not published yet");
    server.publish(1, &[1.0, 2.0, 3.0]);
    let view = worker.view_params(1).unwrap();
    assert_eq!(view.values(), [1.0, 2.0, 3.0]);
    // Steps in other slots leave it intact; the step that takes its slot does not.
    server.publish(2, &[9.0; 3]);
    assert!(view.intact());
    server.publish(1 + PARAM_SLOTS as u64, &[7.0; 3]);
    assert!(!view.intact());
    assert_eq!(worker.view_params(1).unwrap_err(), SlotError::Other);
}

#[test]
fn parameters_overwritten_by_a_later_step_are_not_read_as_the_earlier_one() {
    let server = SharedRegion::create(3, 1).unwrap();
    server.publish(1, &[1.0; 3]);
    server.publish(1 + PARAM_SLOTS as u64, &[2.0; 3]);
    let mut got = Vec::new();
    assert_eq!(server.read_params(1, &mut got), Err(SlotError::Other));
    server.read_params(1 + PARAM_SLOTS as u64, &mut got).unwrap();
    assert_eq!(got, [2.0; 3]);
}

#[test]
fn a_gradient_rewritten_after_its_push_named_it_is_refused() {
    let server = Arc::new(SharedRegion::create(2, 1).unwrap());
    let seq = write_gradient(&server, 0, 3, &[1.0, 1.0]);
    write_gradient(&server, 0, 3, &[9.0, 9.0]);
    assert_eq!(server.gradient(0, 3, seq).err(), Some(SlotError::Other));
    assert_eq!(server.gradient(5, 3, seq).err(), Some(SlotError::Other), "no such worker");
}

#[test]
fn a_slot_being_written_is_not_read() {
    let server = SharedRegion::create(2, 1).unwrap();
    server.publish(2, &[1.0, 1.0]);
    // A writer stopped half-way (the sequence number odd).
    let at = server.slot_at(2);
    server.word(at, 0).fetch_add(1, Ordering::Relaxed);
    assert_eq!(server.read_params(2, &mut Vec::new()), Err(SlotError::Rewritten));
}

#[test]
fn a_gradient_computed_in_place_is_read_once_finished_and_not_while_it_is_written() {
    let server = SharedRegion::create(3, 2).unwrap();
    let worker = opened(&server, 3, 1);
    let before = write_gradient(&worker, 1, 4, &[1.0; 3]);
    let mut write = worker.gradient_write(1).unwrap();
    write.values().copy_from_slice(&[0.5, 1.5, 2.5]);
    // Half-way: neither the earlier push nor anything else can be read from the slot.
    assert_eq!(server.gradient(1, 4, before).err(), Some(SlotError::Rewritten));
    let seq = write.finish(5);
    assert_ne!(seq, before);
    assert_eq!(server.gradient(1, 5, seq).unwrap().values(), [0.5, 1.5, 2.5]);
    assert_eq!(server.gradient(1, 4, before).err(), Some(SlotError::Other), "the earlier push is gone");
}

#[test]
fn no_write_starts_in_a_gradient_slot_while_the_server_reads_it_in_place() {
    let server = SharedRegion::create(3, 1).unwrap();
    let worker = opened(&server, 3, 0);
    let seq = write_gradient(&worker, 0, 2, &[1.0; 3]);
    let read = server.gradient(0, 2, seq).unwrap();
    // Another process of this index (one that outlived its session) cannot write meanwhile,
    // nor can the push be read twice at once.
    assert!(worker.gradient_write(0).is_none());
    assert!(server.gradient(0, 2, seq).is_err());
    assert_eq!(read.values(), [1.0; 3]);
    drop(read);
    let mut write = worker.gradient_write(0).expect("writable once read");
    write.values().copy_from_slice(&[2.0; 3]);
    let next = write.finish(3);
    assert_eq!(server.gradient(0, 3, next).unwrap().values(), [2.0; 3]);
}

#[test]
fn a_gradient_read_in_place_never_changes_under_the_server_while_its_worker_keeps_writing() {
    // The worker rewrites its slot over and over (each write one value throughout), trying
    // again at once when the server holds it; the server reads the newest write in place
    // and looks at the values twice, letting the worker run between: a write landing
    // meanwhile would show.
    use std::sync::atomic::AtomicBool;
    let server = Arc::new(SharedRegion::create(4096, 1).unwrap());
    let worker = opened(&server, 4096, 0);
    let newest = Arc::new(std::sync::Mutex::new(None::<(u64, u64)>));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (worker, newest, stop) = (worker.clone(), newest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut step = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Held by the server's read: this write goes elsewhere (gRPC, for a worker).
                let Some(mut write) = worker.gradient_write(0) else { continue };
                step += 1;
                write.values().fill(step as f32);
                *newest.lock().unwrap() = Some((step, write.finish(step)));
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        })
    };
    let (mut reads, start) = (0, std::time::Instant::now());
    while reads < 200 && start.elapsed() < std::time::Duration::from_secs(20) {
        let Some((step, seq)) = *newest.lock().unwrap() else { continue };
        if let Ok(read) = server.gradient(0, step, seq) {
            let first = read.values().to_vec();
            for _ in 0..10 {
                std::thread::yield_now();
            }
            assert!(first.iter().all(|&v| v == step as f32), "a torn gradient was read");
            assert_eq!(read.values(), first, "a write landed in a gradient being read");
            reads += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(reads, 200, "the reader caught too few writes");
}

#[test]
fn a_gradient_write_given_up_leaves_the_slot_writable_and_holding_no_gradient() {
    let server = SharedRegion::create(2, 1).unwrap();
    let worker = opened(&server, 2, 0);
    let seq = write_gradient(&worker, 0, 1, &[1.0; 2]);
    let mut write = worker.gradient_write(0).unwrap();
    write.values().copy_from_slice(&[5.0; 2]);
    drop(write); // abandoned half-way
    assert_eq!(server.gradient(0, 1, seq).err(), Some(SlotError::Other), "the half-written values are no push");
    assert!(worker.gradient_write(0).is_some());
}

#[test]
fn a_slot_left_half_written_by_a_killed_worker_is_taken_over_by_the_next_process_of_its_index() {
    let server = SharedRegion::create(2, 1).unwrap();
    let path = server.path().to_str().unwrap().to_string();
    let killed = Arc::new(SharedRegion::open(&path, server.nonce(), 2, 0).unwrap());
    // The process dies mid-write: nothing ends the write.
    std::mem::forget(killed.gradient_write(0).unwrap());
    assert!(killed.gradient_write(0).is_none(), "the slot is held by the unfinished write");
    let restarted = Arc::new(SharedRegion::open(&path, server.nonce(), 2, 0).unwrap());
    let seq = write_gradient(&restarted, 0, 4, &[3.0; 2]);
    assert_eq!(server.gradient(0, 4, seq).unwrap().values(), [3.0; 2]);
}

#[test]
fn a_file_of_another_run_or_model_or_worker_count_is_not_used() {
    let server = SharedRegion::create(4, 2).unwrap();
    let path = server.path().to_str().unwrap().to_string();
    assert!(SharedRegion::open(&path, server.nonce() ^ 1, 4, 0).unwrap_err().contains("not this server's"));
    assert!(SharedRegion::open(&path, server.nonce(), 5, 0).unwrap_err().contains("not 5"));
    assert!(SharedRegion::open(&path, server.nonce(), 4, 2).unwrap_err().contains("no gradient slot"));
    assert!(SharedRegion::open("/nonexistent/quorum-1-0", 1, 4, 0).is_err());
}

#[test]
#[cfg(target_os = "linux")]
fn a_region_larger_than_the_machine_can_back_is_refused_when_made_not_when_written() {
    // 5 slots of 2^40 values: 20 TiB. Only sized (not reserved), the file would be made,
    // and the first write to a page that memory cannot back would kill the process.
    assert!(SharedRegion::create(1 << 40, 1).is_err());
}

#[test]
fn the_server_removes_its_file_when_it_ends() {
    let path = {
        let server = SharedRegion::create(4, 1).unwrap();
        let path = server.path().to_path_buf();
        assert!(path.exists());
        path
    };
    assert!(!path.exists());
}

#[test]
fn a_file_left_by_a_dead_server_is_removed_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    // No process has this id (beyond the kernel's largest, 2^22).
    let dead = dir.path().join(format!("{PREFIX}4999999-00000000000000aa"));
    let live = dir.path().join(format!("{PREFIX}{}-00000000000000bb", std::process::id()));
    let other = dir.path().join("unrelated-file");
    for p in [&dead, &live, &other] {
        std::fs::write(p, b"x").unwrap();
    }
    remove_abandoned(dir.path());
    assert!(!dead.exists());
    assert!(live.exists() && other.exists());
}

#[test]
fn a_reader_never_keeps_a_torn_copy_while_the_writer_rewrites() {
    // Each write fills the slot with one value; a torn copy would mix two.
    let server = std::sync::Arc::new(SharedRegion::create(4096, 1).unwrap());
    let writer = {
        let s = server.clone();
        std::thread::spawn(move || {
            for i in 0..2000u64 {
                s.publish(0, &vec![i as f32; 4096]);
            }
        })
    };
    let mut got = Vec::new();
    while !writer.is_finished() {
        if server.read_params(0, &mut got).is_ok() {
            assert!(got.iter().all(|&v| v == got[0]), "a torn copy was kept");
        }
    }
    writer.join().unwrap();
    server.read_params(0, &mut got).unwrap();
    assert_eq!(got[0], 1999.0);
}
