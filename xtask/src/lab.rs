pub fn run(_o: &Options) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
#[derive(Debug, clap::Args)]
pub struct Options {}
