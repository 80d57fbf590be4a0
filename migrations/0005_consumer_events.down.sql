DROP TABLE IF EXISTS bus.consumer_events;
