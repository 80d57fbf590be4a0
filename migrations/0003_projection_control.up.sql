-- Stop and start per projection: a stopped version keeps its tables and
-- checkpoint but applies nothing until it is started again.
ALTER TABLE projections.checkpoints ADD COLUMN stopped boolean NOT NULL DEFAULT false;
