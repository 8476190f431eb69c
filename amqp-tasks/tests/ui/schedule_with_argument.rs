use amqp_tasks::{Context, task};

#[task(every = "30s")]
pub async fn refresh(ctx: Context, rate: f64) {
    let _ = (ctx, rate);
}

fn main() {}
