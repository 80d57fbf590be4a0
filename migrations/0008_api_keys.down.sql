DROP TABLE auth.api_keys;
-- Not CASCADE: a later migration's objects in the schema make this fail
-- rather than vanish.
DROP SCHEMA auth;
