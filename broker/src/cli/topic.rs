use super::ConnArgs;
use clap::Subcommand;
use escrow_client::unexpected;
use escrow_proto::{CreateTopic, Request, Response, TopicInfo};

#[derive(Debug, Subcommand)]
pub(crate) enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of queues (partitions).
        #[arg(long, default_value_t = 4)]
        queues: u32,
    },
    /// List topics.
    List,
    /// Show a topic's queues and offsets.
    Describe {
        /// Topic name.
        name: String,
    },
}

fn print(info: &TopicInfo) {
    let messages: u64 = info
        .queues
        .iter()
        .map(|q| q.next_offset - q.low_offset)
        .sum();
    println!(
        "{}\tqueues={}\tmessages={messages}",
        info.name,
        info.queues.len()
    );
}

pub(crate) async fn run(conn: &ConnArgs, command: TopicCommand) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    match command {
        TopicCommand::Create { name, queues } => {
            match client
                .request(&Request::CreateTopic(CreateTopic {
                    topic: name,
                    queues,
                }))
                .await?
            {
                Response::Topic(info) => print(&info),
                other => return Err(unexpected("create_topic", &other).into()),
            }
        }
        TopicCommand::List => match client.request(&Request::ListTopics).await? {
            Response::Topics(topics) => topics.iter().for_each(print),
            other => return Err(unexpected("list_topics", &other).into()),
        },
        TopicCommand::Describe { name } => {
            match client
                .request(&Request::DescribeTopic { topic: name })
                .await?
            {
                Response::Topic(info) => {
                    print(&info);
                    for (i, q) in info.queues.iter().enumerate() {
                        println!("  queue {i}\tlow={}\tnext={}", q.low_offset, q.next_offset);
                    }
                }
                other => return Err(unexpected("describe_topic", &other).into()),
            }
        }
    }
    Ok(())
}
