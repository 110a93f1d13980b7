mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_smoke() {
    let mut net = common::netns::Net::create();
    let epyc = net.node("epyc");
    let srv = epyc.rt.run(async { tokio::net::TcpListener::bind("198.51.100.2:7000").await.unwrap() }).await;
    let acc = epyc.rt.spawn(async move {
        loop {
            let (mut s, _) = srv.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                use tokio::io::*;
                while s.read_exact(&mut b).await.is_ok() {
                    s.write_all(&b).await.unwrap();
                }
            });
        }
    });
    async fn rtt(net: &common::netns::Net) -> std::time::Duration {
        let o = net.node("optiplex");
        o.rt.run(async {
            use tokio::io::*;
            let mut s = tokio::net::TcpStream::connect("198.51.100.2:7000").await.unwrap();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                s.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
            }
            t.elapsed() / 5
        })
        .await
    }
    eprintln!("rtt {:?}", rtt(&net).await);
    net.delay(std::time::Duration::from_millis(100));
    eprintln!("rtt delayed {:?}", rtt(&net).await);
    net.undelay();
    eprintln!("rtt after {:?}", rtt(&net).await);
    net.cut("epyc");
    let o = net.node("optiplex");
    let r =
        o.rt.run(async {
            tokio::time::timeout(std::time::Duration::from_secs(2), tokio::net::TcpStream::connect("198.51.100.2:7000"))
                .await
                .is_ok()
        })
        .await;
    eprintln!("connect while cut completed: {r}");
    acc.abort();
}
