//! The bundled terminal client, driven through its stdin and stdout as a
//! person would use it in two terminals.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{PASSWORD, Server};

struct Chat {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Chat {
    fn start(server: &Server, user: &str) -> Chat {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["chat", "--auth", &server.auth_url, "--user", user, "--password", PASSWORD, "--ca"])
            .arg(&server.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tern chat");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut chat = Chat { child, stdin, lines };
        chat.expect("logged in as");
        chat
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for a line containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(needle) {
                return line;
            }
            seen.push(line);
        }
        panic!("no line with {needle:?}; saw {seen:?}");
    }

    /// Runs `command` until its output, which ends with a line containing
    /// `end`, has a line containing `needle` (for reads of what another
    /// consumer stores, such as history, which may trail the push).
    fn expect_after_retries(&mut self, command: &str, needle: &str, end: &str) -> String {
        let mut outputs = Vec::new();
        for _ in 0..50 {
            self.say(command);
            let mut output = Vec::new();
            loop {
                let line = self.expect("");
                let last = line.contains(end);
                output.push(line);
                if last {
                    break;
                }
            }
            if let Some(line) = output.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            outputs.push(output);
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{command}: never a line with {needle:?}; saw {outputs:?}");
    }

    fn quit(mut self) {
        self.say(":q");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("tern chat did not quit on :q");
    }
}

#[test]
fn two_terminals_chat_privately_and_in_a_group() {
    let (server, _dir) = Server::start();
    let mut bob = Chat::start(&server, "bob");
    let mut alice = Chat::start(&server, "alice");

    alice.say(":msg bob hello bob, how are you?");
    alice.expect("sent #1");
    assert_eq!(bob.expect("[alice]"), "[alice] hello bob, how are you? (#1)");

    bob.say(":to alice");
    bob.expect("now chatting with alice");
    bob.say("fine, thanks");
    assert_eq!(alice.expect("[bob]"), "[bob] fine, thanks (#2)");

    alice.say(":create crew bob");
    alice.expect("created crew with alice, bob");
    alice.say(":gmsg crew welcome aboard");
    assert_eq!(bob.expect("[crew]"), "[crew] alice: welcome aboard (#1)");
    bob.say(":groups");
    bob.expect("groups: crew (2)");
    bob.say(":olu");
    bob.expect("online: alice, bob");
    // History is stored by group-svc's consumer, which may trail the push.
    bob.expect_after_retries(":history crew", "[crew] alice: welcome aboard (#1)", "message(s)");
    bob.say(":msg nobody hi");
    bob.expect("error NO_SUCH_USER");

    // bob leaves; what alice sends meanwhile is shown at his next login.
    bob.quit();
    alice.say(":msg bob are you there?");
    alice.expect("sent #3");
    let mut bob = Chat::start(&server, "bob");
    assert_eq!(bob.expect("[alice]"), "[alice] are you there? (#3)");
    bob.quit();
    alice.quit();
}
