-- May delivery ARGV[1] be attempted now? Per destination: at most ARGV[4] attempts at once and a
-- circuit breaker (open: none; half open after the cool-down: one probe at a time); per tenant: at
-- most ARGV[5] attempts at once (0: no cap). Holders are leased (ms scores), so a crashed worker's
-- hold ends by itself.
-- KEYS: 1 destination in-flight zset, 2 destination circuit hash, 3 tenant in-flight zset
-- ARGV: 1 delivery id, 2 now ms, 3 lease ms, 4 destination limit, 5 tenant limit
-- Returns {verdict, wait ms, failing since ms}: go | busy (being attempted elsewhere) | open | full
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'busy', 0, 0} end
local circuit = redis.call('HMGET', KEYS[2], 'open_until', 'failing_since')
local open_until = tonumber(circuit[1] or '0')
local failing_since = tonumber(circuit[2] or '0')
if open_until > now then return {'open', open_until - now, failing_since} end
local limit = tonumber(ARGV[4])
if open_until > 0 then limit = 1 end
if redis.call('ZCARD', KEYS[1]) >= limit then return {'full', 0, failing_since} end
local tenant_limit = tonumber(ARGV[5])
if tenant_limit > 0 and redis.call('ZCARD', KEYS[3]) >= tenant_limit then return {'full', 0, failing_since} end
local lease_end = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
redis.call('ZADD', KEYS[3], lease_end, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {'go', 0, failing_since}
