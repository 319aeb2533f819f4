-- The MySQL schema of ollamabalancer, as the balancer creates it (or upgrades the seed's
-- tables to it) on start. It is kept equal to MYSQL_SCHEMA in ollamabalancer.py by a test.

CREATE TABLE IF NOT EXISTS `ollamaServers` (
  `id` int NOT NULL AUTO_INCREMENT,
  `port` int NOT NULL,
  `host` varchar(255) NOT NULL,
  `location` varchar(255) NULL,
  `runner` varchar(255) NULL,
  `models` json,
  `last_checked` timestamp NULL,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
  `scheme` varchar(8) NOT NULL DEFAULT 'http',
  `name` varchar(255) NULL,
  `enabled` tinyint NOT NULL DEFAULT 1,
  `proxy_id` int NULL,
  `weight` double NOT NULL DEFAULT 1,
  `max_concurrency` int NULL,
  `upstream_auth` varchar(3072) NULL,
  `num_parallel` int NULL,
  `max_loaded_models` int NULL,
  `draining` tinyint NOT NULL DEFAULT 0,
  `labels` text NULL,
  `owner` varchar(16) NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `ollamaServers_host_port` (`host`, `port`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `proxy` (
  `id` int NOT NULL AUTO_INCREMENT,
  `name` varchar(255) NOT NULL,
  `ip` varchar(255) NOT NULL,
  `port` int NOT NULL,
  `user_name` varchar(255),
  `password` varchar(1536),
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
  `protocol` varchar(255) NOT NULL DEFAULT 'http',
  `status` tinyint NOT NULL DEFAULT 1,
  PRIMARY KEY (`id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `server_handle` (
  `token` varchar(64) NOT NULL,
  `server_id` int NOT NULL,
  `proxy_id` int NOT NULL DEFAULT 0,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  PRIMARY KEY (`token`),
  UNIQUE KEY `server_handle_pair` (`server_id`, `proxy_id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `api_key` (
  `id` int NOT NULL AUTO_INCREMENT,
  `name` varchar(255) NOT NULL,
  `key_hash` char(64) NOT NULL,
  `requests_per_minute` int NULL,
  `max_concurrent` int NULL,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `last_used_at` timestamp NULL,
  `models` text NULL,
  `tokens_per_day` bigint NULL,
  `weight` double NOT NULL DEFAULT 1,
  `priority` varchar(8) NOT NULL DEFAULT 'normal',
  `labels` text NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `api_key_hash` (`key_hash`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `key_usage` (
  `key_id` int NOT NULL,
  `day` date NOT NULL,
  `model` varchar(255) NOT NULL,
  `requests` bigint NOT NULL DEFAULT 0,
  `prompt_tokens` bigint NOT NULL DEFAULT 0,
  `completion_tokens` bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (`key_id`, `day`, `model`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `usage_applied` (
  `instance` varchar(32) NOT NULL,
  `batch` bigint NOT NULL,
  PRIMARY KEY (`instance`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `balancer_meta` (
  `name` varchar(64) NOT NULL,
  `value` varchar(255) NOT NULL,
  PRIMARY KEY (`name`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `change_log` (
  `revision` bigint NOT NULL AUTO_INCREMENT,
  `kind` varchar(16) NOT NULL,
  `row_id` varchar(64) NOT NULL,
  PRIMARY KEY (`revision`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `instances` (
  `id` varchar(32) NOT NULL,
  `beat_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `demand` mediumtext NOT NULL,
  `holding` mediumtext NOT NULL,
  PRIMARY KEY (`id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `learned` (
  `server_id` int NOT NULL,
  `figures` varchar(255) NOT NULL,
  PRIMARY KEY (`server_id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
