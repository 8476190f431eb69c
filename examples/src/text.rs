//! Text tasks, grouped on one queue.

use amqp_tasks::{State, task};

/// Upper-cases a text.
#[task(queue = "text")]
pub async fn shout(text: String) -> String {
    text.to_uppercase()
}

/// Counts the words of a text.
#[task(queue = "text")]
pub async fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}

/// What the worker says hello with: its state, given at start-up (see the `worker` binary).
#[derive(Debug)]
pub struct Greetings {
    /// The word for hello.
    pub hello: String,
}

/// Greets someone with the worker's word for hello (a task with state: `State<Greetings>`).
#[task(queue = "text")]
pub async fn greet(greetings: State<Greetings>, name: String) -> String {
    format!("{} {name}", greetings.hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_tasks::testing::TestWorker;

    #[tokio::test]
    async fn tasks_with_state_run_in_a_test_worker() {
        let test = TestWorker::new().state(Greetings {
            hello: "hej".into(),
        });
        assert_eq!(
            greet::new("Ada".into()).call(&test).await,
            Ok("hej Ada".to_owned())
        );
        assert_eq!(
            shout::new("hi".into()).call(&test).await,
            Ok("HI".to_owned())
        );
    }
}
