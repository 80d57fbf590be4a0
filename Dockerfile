# Build the eventfold binary and run it on a slim base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p eventfold

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 eventfold
COPY --from=build /src/target/release/eventfold /usr/local/bin/eventfold
USER eventfold
EXPOSE 50051
# Ready while the admin listener (127.0.0.1:9464 by default in dev) says so.
HEALTHCHECK --interval=10s --timeout=5s CMD ["/usr/local/bin/eventfold", "probe"]
ENTRYPOINT ["/usr/local/bin/eventfold"]
CMD ["dev", "--listen", "0.0.0.0:50051"]
