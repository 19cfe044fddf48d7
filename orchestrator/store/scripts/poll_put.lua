-- Schedule poll ARGV[2] (seq) of job ARGV[1] at ARGV[3] (ms) with rank ARGV[4], unless a newer poll is
-- scheduled; mark the job in the sweeper's index as on the board until ARGV[5]; name the board in
-- KEYS[5]; a callback-woken job (negative rank) wakes the pollers on channel KEYS[6].
-- KEYS: 1 due, 2 ready, 3 meta, 4 active, 5 boards, 6 wake channel; ARGV: 1 job id, 2 seq, 3 at ms,
--       4 rank, 5 active score, 6 "{provider}:{key_id}"
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  local old_seq = tonumber(string.match(old, '^(%d+):'))
  if old_seq and old_seq > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], 'XX', ARGV[5], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
if tonumber(ARGV[4]) < 0 then redis.call('PUBLISH', KEYS[6], ARGV[6]) end
return 1
