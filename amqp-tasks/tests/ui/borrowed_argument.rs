use amqp_tasks::task;

#[task]
pub async fn shout(text: &str) -> String {
    text.to_uppercase()
}

fn main() {}
