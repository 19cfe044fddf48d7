-- Record the outcome of delivery ARGV[1]'s attempt: free its holds; a success closes the circuit,
-- a failure counts, and ARGV[4] failures in a row open it for a cool-down that doubles with each
-- further failure (ARGV[5] ms, at most ARGV[6] ms).
-- KEYS: 1 destination in-flight zset, 2 destination circuit hash, 3 tenant in-flight zset
-- ARGV: 1 delivery id, 2 now ms, 3 ok (1|0), 4 failures to open, 5 cool-down ms, 6 longest cool-down ms,
--       7 circuit record ttl ms
-- Returns the time (ms) the circuit is open until, 0 when closed.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])
  return 0
end
local now = tonumber(ARGV[2])
local failures = redis.call('HINCRBY', KEYS[2], 'failures', 1)
redis.call('HSETNX', KEYS[2], 'failing_since', ARGV[2])
local open_until = 0
local threshold = tonumber(ARGV[4])
if failures >= threshold then
  local cooldown = math.min(tonumber(ARGV[5]) * 2 ^ math.min(failures - threshold, 30), tonumber(ARGV[6]))
  open_until = now + math.floor(cooldown)
  redis.call('HSET', KEYS[2], 'open_until', open_until)
end
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return open_until
