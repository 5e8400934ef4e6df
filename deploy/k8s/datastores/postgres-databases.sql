-- One database per service: AIDC_DATABASE_URL ends in aidc_{service}. Run once, when the data volume is empty.
CREATE DATABASE aidc_auth;
CREATE DATABASE aidc_storage;
CREATE DATABASE aidc_training;
CREATE DATABASE aidc_scheduler;
CREATE DATABASE aidc_billing;
CREATE DATABASE aidc_serving;
