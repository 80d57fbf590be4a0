DROP TABLE topic_catalog.topics;
-- Not CASCADE: a later migration's objects in the schema make this fail
-- rather than vanish.
DROP SCHEMA topic_catalog;
