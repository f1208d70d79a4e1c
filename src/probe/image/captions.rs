//! The caption each image is scored and sampled with: its sidecar `NAME.txt`; else the
//! adapter's most frequent training tags (sd-scripts' `ss_tag_frequency`: the trigger word
//! and the tags the trainer captioned with, the words the adapter was taught to answer to);
//! else the empty caption. The result records which, per image.

use crate::load::Adapter;

crate::named::closed_set! {
    /// Where an image's caption came from.
    pub enum CaptionSource ("caption source") {
        Sidecar = "sidecar",
        AdapterTags = "adapter-tags",
        Empty = "empty",
    }
}

/// Most training tags put into a fallback caption: CLIP reads 75 tokens, and beyond the
/// first few tags sd-scripts' frequencies are mostly per-image details.
pub const MAX_CAPTION_TAGS: usize = 8;

/// The fallback caption from the adapter's tags, most frequent first (ties by name).
pub(crate) fn adapter_caption(adapter: &Adapter) -> Option<String> {
    let tags: Vec<&str> = adapter
        .metadata
        .training
        .tags
        .iter()
        .map(|t| t.tag.as_str())
        .filter(|t| !t.is_empty())
        .take(MAX_CAPTION_TAGS)
        .collect();
    (!tags.is_empty()).then(|| tags.join(", "))
}

/// An image's caption and its source.
pub(crate) fn choose(sidecar: Option<&str>, tags: &Option<String>) -> (String, CaptionSource) {
    match (sidecar, tags) {
        (Some(c), _) => (c.to_string(), CaptionSource::Sidecar),
        (None, Some(t)) => (t.clone(), CaptionSource::AdapterTags),
        (None, None) => (String::new(), CaptionSource::Empty),
    }
}

/// One note per caption source used other than sidecars, so the reader knows what the model
/// was asked.
pub(crate) fn notes(subjects: &[super::denoise::Subject], tags: &Option<String>) -> Vec<String> {
    let count = |s: CaptionSource| subjects.iter().filter(|x| x.caption_source == s).count();
    let mut out = vec![];
    let n = count(CaptionSource::AdapterTags);
    if n > 0 {
        out.push(format!(
            "{n} image(s) have no caption file (NAME.txt); they were captioned with the adapter's most frequent \
             training tags: {:?}",
            tags.as_deref().unwrap_or("")
        ));
    }
    let n = count(CaptionSource::Empty);
    if n > 0 {
        out.push(format!(
            "{n} image(s) have no caption file and the adapter records no training tags: they were scored with the \
             empty caption, so the conditional scores (gain, CLiD, Wen) say less about them"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_then_tags_then_empty() {
        let tags = Some("ohwx, painting".to_string());
        assert_eq!(choose(Some("a cat"), &tags), ("a cat".into(), CaptionSource::Sidecar));
        assert_eq!(choose(None, &tags), ("ohwx, painting".into(), CaptionSource::AdapterTags));
        assert_eq!(choose(None, &None), (String::new(), CaptionSource::Empty));
    }
}
