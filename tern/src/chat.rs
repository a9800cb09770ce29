//! `tern chat`: an interactive terminal client on the SDK.
//!
//! Lines starting with `:` are commands (`:help` lists them); any other line
//! is sent to the current target, chosen with `:to USER` or `:group GROUP`.

use std::path::PathBuf;

use tern_sdk::pb::{self, ConversationKind};
use tern_sdk::{Client, ClientConfig, ClientError, Event, TlsMode};
use tokio::io::{AsyncBufReadExt, BufReader};

pub const HELP: &str = "\
commands:
  :to USER                 chat with USER; plain lines go to them
  :group GROUP             chat in GROUP; plain lines go to it
  :msg USER TEXT           send one private message
  :gmsg GROUP TEXT         send one group message
  :olu                     list online users
  :create GROUP [USER...]  create a group with you and USERs in it
  :join GROUP              join a group
  :leave GROUP             leave a group
  :members GROUP           list a group's members
  :groups                  list your groups
  :history GROUP [N]       the last N (default 20) messages of a group
  :help                    this text
  :q                       quit";

/// How `tern chat` connects.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub auth_url: String,
    pub user: String,
    pub password: String,
    pub device: String,
    /// CA file for TLS; `None` with `plaintext`.
    pub ca_cert: Option<PathBuf>,
    pub plaintext: bool,
    pub access_addr: Option<String>,
}

enum Target {
    None,
    User(String),
    Group(String),
}

fn format_message(me: &str, m: &pb::Message) -> String {
    let text = String::from_utf8_lossy(&m.content);
    if m.kind == ConversationKind::Group as i32 {
        format!("[{}] {}: {} (#{})", m.group_id, m.sender, text, m.seq)
    } else if m.sender == me {
        format!("[you → {}] {} (#{})", m.receiver, text, m.seq)
    } else {
        format!("[{}] {} (#{})", m.sender, text, m.seq)
    }
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Server(s) => format!("error {}: {}", s.code, s.message),
        other => format!("error: {other}"),
    }
}

/// Runs the client until `:q` or end of input.
pub async fn run(options: ChatOptions) -> anyhow::Result<()> {
    let tls = if options.plaintext {
        TlsMode::Plain
    } else {
        let ca = options
            .ca_cert
            .clone()
            .ok_or_else(|| anyhow::anyhow!("TLS needs --ca PATH (the server prints it), or --plaintext"))?;
        TlsMode::CaFile(ca)
    };
    let mut config = ClientConfig::new(&options.auth_url, &options.user, &options.password, tls);
    config.device_id = options.device.clone();
    config.access_addr = options.access_addr.clone();
    config.register_if_missing = true;
    let (client, mut events) = Client::connect(config).await.map_err(|e| anyhow::anyhow!(describe(&e)))?;
    let pending = client.login_info().map(|l| l.pending_offline).unwrap_or(0);
    println!("logged in as {} — {} offline message(s). :help lists commands.", options.user, pending);

    let me = options.user.clone();
    let printer = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Message(m) => println!("{}", format_message(&me, &m)),
                Event::Disconnected(reason) => match reason {
                    Some(e) => println!("-- disconnected ({}): reconnecting", e.message),
                    None => println!("-- disconnected: reconnecting"),
                },
                Event::Reconnected => println!("-- reconnected"),
                Event::Skipped { conversation, missing } => {
                    println!("-- {conversation}: message(s) {missing:?} never arrived")
                }
                Event::Kicked(why) => {
                    println!("-- signed out: {why}");
                    break;
                }
            }
        }
    });

    let mut target = Target::None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == ":q" {
            break;
        }
        if let Err(e) = handle_line(&client, &mut target, line).await {
            println!("{}", describe(&e));
        }
    }
    client.close().await;
    printer.abort();
    Ok(())
}

async fn handle_line(client: &Client, target: &mut Target, line: &str) -> Result<(), ClientError> {
    let Some(command) = line.strip_prefix(':') else {
        return match target {
            Target::None => {
                println!("no target: use :to USER or :group GROUP first");
                Ok(())
            }
            Target::User(user) => {
                client.send_single(user, line.as_bytes()).await.map(|ack| println!("sent #{}", ack.seq))
            }
            Target::Group(group) => {
                client.send_group(group, line.as_bytes()).await.map(|ack| println!("sent #{}", ack.seq))
            }
        };
    };
    let mut words = command.split_whitespace();
    let name = words.next().unwrap_or("");
    let args: Vec<&str> = words.collect();
    let rest = |skip: usize| {
        // Text after the first `skip` words, spacing preserved.
        let mut s = command;
        for _ in 0..=skip {
            s = s.trim_start();
            s = s.find(char::is_whitespace).map(|i| &s[i..]).unwrap_or("");
        }
        s.trim().to_owned()
    };
    match (name, args.as_slice()) {
        ("help", _) => println!("{HELP}"),
        ("to", [user]) => {
            *target = Target::User((*user).to_owned());
            println!("now chatting with {user}");
        }
        ("group", [group]) => {
            *target = Target::Group((*group).to_owned());
            println!("now chatting in group {group}");
        }
        ("msg", [user, _, ..]) => {
            let ack = client.send_single(user, rest(1).into_bytes()).await?;
            println!("sent #{}", ack.seq);
        }
        ("gmsg", [group, _, ..]) => {
            let ack = client.send_group(group, rest(1).into_bytes()).await?;
            println!("sent #{}", ack.seq);
        }
        ("olu", []) => println!("online: {}", client.online_users().await?.join(", ")),
        ("create", [group, members @ ..]) => {
            let info = client.create_group(group, group, members).await?;
            println!("created {} with {}", info.group_id, info.members.join(", "));
        }
        ("join", [group]) => {
            let info = client.join_group(group).await?;
            println!("joined {} ({} members)", info.group_id, info.members.len());
        }
        ("leave", [group]) => {
            client.leave_group(group).await?;
            println!("left {group}");
        }
        ("members", [group]) => {
            println!("{}: {}", group, client.group_members(group).await?.members.join(", "))
        }
        ("groups", []) => {
            let groups = client.list_groups().await?;
            let names: Vec<String> =
                groups.iter().map(|g| format!("{} ({})", g.group_id, g.members.len())).collect();
            println!("groups: {}", names.join(", "));
        }
        ("history", [group]) | ("history", [group, _]) => {
            let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20);
            let page = client.group_history(group, 0, n).await?;
            // Oldest first reads naturally in a terminal.
            for m in page.messages.iter().rev() {
                println!("{}", format_message(client.user_id(), m));
            }
            println!("-- {} message(s){}", page.messages.len(), if page.more { ", more before" } else { "" });
        }
        _ => println!("unknown command or wrong arguments: :{command} (:help lists commands)"),
    }
    Ok(())
}
